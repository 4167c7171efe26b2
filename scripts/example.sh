#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs the seed workflow example with its quick
# defaults (float, fixed8, bfp8, fixed8_roles, and the bfp word-length sweep; see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/lenet_lowp.py "$@"
