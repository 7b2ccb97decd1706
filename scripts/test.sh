#!/usr/bin/env bash
# Set up (CPU torch, itnet, test deps) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRITON_INTERPRET=1
exec .venv/bin/python -m pytest -q "$@"
