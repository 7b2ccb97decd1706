"""Program bundles: a directory with ``program.itir`` (text), ``weights.safetensors`` and ``meta.json``.

Only text, JSON and safetensors are read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from ..errors import ItnetError
from .core import Program
from .parser import parse
from .printer import print_program
from .verify import verify

FORMAT = 1


def save(prog: Program, path: str | Path) -> None:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "program.itir").write_text(print_program(prog))
    keys = {w.key for w in prog.weights}
    missing = keys - set(prog.tensors)
    if missing:
        raise ItnetError(f"cannot save: no tensor for weight(s) {sorted(missing)[:3]}")
    tensors = _unshared({k: prog.tensors[k].detach() for k in sorted(keys)})
    safetensors.torch.save_file(tensors, str(out / "weights.safetensors"))
    meta = {
        "format": FORMAT,
        "torch": torch.__version__,
        **{k: v for k, v in prog.meta.items() if k not in ("format", "torch", "transforms")},
        "transforms": [{"layer": n.layer, "family": n.family, "lowering": n.lowering} for n in prog.transforms],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied weights) or are not contiguous: copy only those."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if (
            ptr in seen
            or not t.is_contiguous()
            or t.storage_offset() != 0
            or t.numel() != t.untyped_storage().nbytes() // max(t.element_size(), 1)
        ):
            t = t.contiguous().clone()
        seen.add(ptr)
        out[k] = t
    return out


def load(path: str | Path) -> Program:
    src = Path(path)
    text_file = src / "program.itir" if src.is_dir() else src
    if not text_file.exists():
        raise ItnetError(f"no IR bundle at {path}: expected a directory with program.itir (run itnet convert first)")
    prog = parse(text_file.read_text())
    weights = text_file.parent / "weights.safetensors"
    meta = text_file.parent / "meta.json"
    meta_data: dict = {}
    if meta.exists():
        meta_data = json.loads(meta.read_text())
        fmt = meta_data.get("format")
        if fmt != FORMAT:
            raise ItnetError(f"bundle {path} has format {fmt}, this itnet reads format {FORMAT}; re-run itnet convert")
    if prog.weights:
        if not weights.exists():
            raise ItnetError(f"bundle {path} has no weights.safetensors; re-run itnet convert")
        prog.tensors = safetensors.torch.load_file(str(weights))
    prog.meta = {k: v for k, v in meta_data.items() if k not in ("format", "torch", "transforms")}
    verify(prog)
    return prog
