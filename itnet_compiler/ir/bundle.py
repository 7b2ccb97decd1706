"""Program bundles: a directory with ``program.itir`` (text), ``weights.safetensors`` and ``meta.json``, and
``fitted.safetensors`` when approximate lowerings were calibrated (``itc.calibrate``).

Only text, JSON and safetensors are read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import safetensors.torch
import torch

from ..errors import ItnetError, first_line
from .core import Program
from .parser import MAX_NESTING, json_depth, parse
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
    try:
        safetensors.torch.save_file(tensors, str(out / "weights.safetensors"))
    except (KeyError, ValueError, TypeError) as e:  # e.g. a dtype safetensors cannot store (complex)
        raise ItnetError(f"cannot save the weights as safetensors ({first_line(e)})") from None
    fitted = _fitted_keys(prog.meta.get("fitted", {}))
    if fitted:
        missing = set(fitted) - set(prog.fitted)
        if missing:
            raise ItnetError(f"cannot save: no fitted tensor for {sorted(missing)[:3]}")
        safetensors.torch.save_file(_unshared({k: prog.fitted[k].detach().cpu() for k in fitted}),
                                    str(out / "fitted.safetensors"))  # fmt: skip
    elif (out / "fitted.safetensors").exists():
        (out / "fitted.safetensors").unlink()  # a bundle rewritten without calibration keeps no stale factors
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


MAX_PROGRAM_BYTES = 1 << 30
MAX_META_BYTES = 16 << 20


def load(path: str | Path) -> Program:
    """Read a bundle (or a bare ``.itir`` text file). Every file is read bounded and checked: a bundle may come from
    anyone, and whatever is wrong with it is one ``ItnetError``; nothing in it is executed or unpickled."""
    src = Path(path)
    text_file = src / "program.itir" if src.is_dir() else src
    if not text_file.exists():
        raise ItnetError(f"no IR bundle at {path}: expected a directory with program.itir (run itnet convert first)")
    prog = parse(read_text(text_file, MAX_PROGRAM_BYTES))
    weights = text_file.parent / "weights.safetensors"
    meta = text_file.parent / "meta.json"
    meta_data: dict = {}
    if meta.exists() or meta.is_symlink():
        meta_data = _read_meta(meta)
        fmt = meta_data.get("format")
        if fmt != FORMAT:
            raise ItnetError(f"bundle {path} has format {fmt!r}; this itnet reads {FORMAT}: re-run itnet convert")
    if prog.weights:
        if not weights.exists():
            raise ItnetError(f"bundle {path} has no weights.safetensors; re-run itnet convert")
        prog.tensors = read_tensors(weights)
    prog.meta = {k: v for k, v in meta_data.items() if k not in ("format", "torch", "transforms")}
    keys = _fitted_keys(prog.meta.get("fitted", {}))
    if keys:
        fitted_file = text_file.parent / "fitted.safetensors"
        if not fitted_file.exists():
            raise ItnetError(
                f"bundle {path} records fitted factors but has no fitted.safetensors; re-run itnet calibrate"
            )
        tensors = read_tensors(fitted_file)
        missing = set(keys) - set(tensors)
        if missing:
            raise ItnetError(f"{fitted_file} lacks {sorted(missing)[:3]}; re-run itnet calibrate")
        prog.fitted = {k: tensors[k] for k in keys}
    verify(prog)
    return prog


def _regular(file: Path) -> os.stat_result:
    try:
        st = file.stat()
    except OSError as e:
        raise ItnetError(f"cannot read {file}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ItnetError(f"{file} is {kind}; a bundle holds program.itir, weights.safetensors and meta.json files")
    return st


def read_text(file: Path, limit: int) -> str:
    """A regular file's UTF-8 text, at most ``limit`` bytes, or one ``ItnetError``."""
    if _regular(file).st_size > limit:
        raise ItnetError(f"{file} is larger than {limit >> 20} MiB; it is not a program itnet wrote")
    try:
        with open(file, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ItnetError(f"cannot read {file}: {e.strerror or e}") from None
    if len(data) > limit:
        raise ItnetError(f"{file} is larger than {limit >> 20} MiB; it is not a program itnet wrote")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ItnetError(f"{file} is not UTF-8 text (byte {e.start}); it is not a file itnet wrote") from None


def read_json(file: Path, limit: int = MAX_META_BYTES) -> object:
    """A regular file's JSON value, bounded in size and depth, or one ``ItnetError``."""
    text = read_text(file, limit)
    deep = json_depth(text, 0, MAX_NESTING)
    if deep is not None:
        raise ItnetError(f"{file} nests deeper than {MAX_NESTING} levels; it is not a file itnet wrote")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer past Python's digit limit
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ItnetError(f"{file} is not valid JSON{where}") from None
    return data


def _read_meta(file: Path) -> dict:
    data = read_json(file)
    if not isinstance(data, dict):
        raise ItnetError(f"{file} must hold a JSON object, not {type(data).__name__}; re-run itnet convert")
    for key, ok in _META_CHECKS.items():
        if key in data and not ok(data[key]):
            raise ItnetError(f"{file}: the entry {key!r} is malformed; re-run itnet convert")
    return data


def _size(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31


def _example_ok(ex: object) -> bool:
    if not isinstance(ex, dict):
        return False
    sizes, inputs = ex.get("sizes", {}), ex.get("inputs", [])
    if not isinstance(sizes, dict) or not all(isinstance(k, str) and _size(v) for k, v in sizes.items()):
        return False
    if not isinstance(inputs, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in inputs):
        return False
    ranges = [e["range"] for e in inputs if "range" in e]
    return all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(b, int) and abs(b) < 2**63 for b in r) and r[0] < r[1]
        for r in ranges
    )


def _fallbacks_ok(fb: object) -> bool:
    layers = fb.get("layers") if isinstance(fb, dict) else None
    return isinstance(layers, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in layers.items())


def _fitted_ok(fitted: object) -> bool:
    """layer -> {"kind": str, "key": [JSON scalars], "tensors": [names]}, as ``RuntimeState.fitted`` writes it."""
    if not isinstance(fitted, dict):
        return False
    for layer, e in fitted.items():
        if not (isinstance(layer, str) and isinstance(e, dict) and isinstance(e.get("kind"), str)):
            return False
        key, names = e.get("key"), e.get("tensors")
        if not isinstance(key, list) or not all(isinstance(x, (str, int, float, bool)) for x in key):
            return False
        if not isinstance(names, list) or not all(isinstance(n, str) and "::" not in n for n in names):
            return False
    return True


def _fitted_keys(fitted: object) -> list[str]:
    if not isinstance(fitted, dict):
        return []
    return [f"{layer}::{n}" for layer, e in fitted.items() for n in e.get("tensors", [])]


# Entries of meta.json that itnet reads back (``source`` is checked where it is used: ``specs.Source.from_json``).
_META_CHECKS = {
    "example": _example_ok,
    "fallbacks": _fallbacks_ok,
    "fitted": _fitted_ok,
    "source": lambda v: isinstance(v, dict),
}


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (nothing else is ever deserialised), or one ``ItnetError``."""
    if not file.exists():
        raise ItnetError(f"no file {file}")
    _regular(file)
    try:
        return safetensors.torch.load_file(str(file))
    except Exception as e:  # SafetensorError, OSError, a header safetensors rejects: all mean a bad file
        raise ItnetError(f"{file} is not a readable safetensors file ({first_line(e)}); re-run itnet convert") from None
