#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv (never the system Python), CPU torch first
# (so nothing pulls a multi-GB CUDA build), then itnet with its test extras. Safe to run again: it reuses .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
if [[ ! -x "$VENV/bin/python" ]]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install -q -e ".[test]"
