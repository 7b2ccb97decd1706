#!/usr/bin/env python3
"""``python cli.py ...`` from the repository root, without installing: the same as the ``itnet`` command."""

import importlib
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(importlib.import_module("itnet_compiler.cli").main())
