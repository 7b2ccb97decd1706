#!/usr/bin/env bash
# Set up on a fresh machine, then convert a real model (a small BERT built offline from examples/bert_small.json),
# show its integral-transform IR, and check the compiled module against the eager model. CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
mkdir -p out
.venv/bin/python cli.py convert hf:BertModel --config examples/bert_small.json --dynamic input_ids:1=seq:2:128 -o out/bert.itir
.venv/bin/python cli.py inspect out/bert.itir
.venv/bin/python cli.py run out/bert.itir --check --trust-source
.venv/bin/python cli.py run out/bert.itir --check --trust-source --lowering '*=fused'
