"""The attention forward (bf16, d128, causal), as a GPU run launches it, compiles for sm_90 (H100/H200) within a
block's shared memory and without spills. No GPU is needed: Triton compiles ahead of time with the ptxas its wheel
ships, so this runs (and is never skipped) on CPU CI; ``bench/compile_sm90.py`` does the same for every kernel.

The compile runs in a child process: this one imported triton with ``TRITON_INTERPRET=1``, which builds Triton's own
library functions for the interpreter, and the GPU code generator cannot call those."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import triton

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = 232448  # bytes of shared memory a block may opt into on sm_90 (227 KB)


def _ptxas() -> Path:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(90).path)
    except (ImportError, TypeError, AttributeError):
        return Path(triton.knobs.nvidia.ptxas.path)


def test_attention_forward_compiles_for_sm90_within_shared_memory_without_spills(tmp_path):
    ptxas = _ptxas()
    assert ptxas.exists(), f"{ptxas} is missing: the triton wheel ships ptxas for sm_90 compiles; reinstall triton"
    out = tmp_path / "compile-sm90.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    match = "attention bf16 d128 causal attention_fwd"
    cmd = [sys.executable, str(ROOT / "bench" / "compile_sm90.py"), "--only", "attention", "--match", match,
           "--jobs", "1", "--timeout", "120", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.exists(), (
        f"bench/compile_sm90.py wrote no result (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1, rows
    (row,) = rows
    # the CUDA defaults (AttentionOptions.default on a cuda device), not the interpreter's 16x16 tiles
    consts = row["constexprs"]
    assert (consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_D"], consts["CAUSAL"]) == (128, 64, 128, True)
    assert row["signature"]["Q"] == "*bf16" and row["num_warps"] == 8
    assert "regs" in row, f"compile failed: {row['problems']}"
    assert row["shared"] <= SMEM_LIMIT, f"{row['shared']} B of shared memory > 227 KB"
    assert row["spills"] == 0, f"ptxas spills {row['spills']} B per thread ({row['regs']} registers)"
    assert row["status"] == "OK", row["problems"]
