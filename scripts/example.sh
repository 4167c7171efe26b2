#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs the example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/formats_tour.py "$@"
