#!/usr/bin/env bash
# Lint, format check and type check (sets the machine up first if needed). CI runs this before
# the tests; `pre-commit install` runs the same checks on every commit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
echo "lint: ruff and mypy passed"
