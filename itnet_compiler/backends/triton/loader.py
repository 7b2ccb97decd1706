"""Generated Triton sources: rendered from templates, written as real ``.py`` files, imported from there.

Triton's ``@jit`` reads the source of the function it compiles, so kernels must live in files. Each rendered kernel
is written to ``<cache>/triton/<template>_<hash>.py`` where the hash covers the template name and the full rendered
text (family kernel expression, constexpr choices), then imported with importlib. ``ITNET_DEBUG=3`` prints each
source once when it is first loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ... import config

_LOADED: dict[str, ModuleType] = {}


def dot_precision(dtype: object) -> str:
    """``tl.dot``'s input precision for operands of ``dtype``: exact for float32, tensor-core rounding otherwise."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


def render(template: str, holes: dict[str, str]) -> str:
    """Fill ``{{NAME}}`` holes; every hole must be filled and nothing else is touched."""
    out = template
    for key, text in holes.items():
        marker = "{{" + key + "}}"
        if marker not in out:
            raise KeyError(f"template has no hole {key}")
        out = out.replace(marker, text)
    if "{{" in out:
        start = out.index("{{")
        raise KeyError(f"unfilled template hole near {out[start : start + 30]!r}")
    return out


def source_path(name: str, source: str) -> Path:
    digest = hashlib.sha256(f"{name}\0{source}".encode()).hexdigest()[:16]
    return config.cache_dir() / "triton" / f"{name}_{digest}.py"


def load(name: str, source: str) -> ModuleType:
    """Write ``source`` (if not cached) and import it; the same text always gives the same module object."""
    path = source_path(name, source)
    key = str(path)
    if key in _LOADED:
        return _LOADED[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(source)
        tmp.replace(path)
    if config.debug_level() >= 3:
        print(f"[itnet] triton kernel {path}:\n{source}", file=sys.stderr)
    spec = importlib.util.spec_from_file_location(f"itnet_generated_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    _LOADED[key] = module
    return module
