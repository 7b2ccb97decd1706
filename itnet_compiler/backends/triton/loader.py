"""Generated Triton sources: rendered from templates, written as real ``.py`` files, imported from there.

Triton's ``@jit`` reads the source of the function it compiles, so kernels must live in files. Each rendered kernel
is written to ``<cache>/triton/<template>_<hash>.py`` where the hash covers the template name and the full rendered
text (family kernel expression, constexpr choices), then imported with importlib. ``ITNET_DEBUG=3`` prints each
source once when it is first loaded.

Built modules may be called from several threads: a source is written and imported once, under a lock, through a
temporary file of its own (so a concurrent writer, thread or process, never leaves a half-written kernel), and under
``TRITON_INTERPRET`` every launch holds one process-wide lock, because Triton's interpreter keeps the current program
id and its patches of ``triton.language`` in globals: two interpreted launches at once corrupt each other.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

from triton.runtime.interpreter import InterpretedFunction

from ... import config

_LOADED: dict[str, ModuleType] = {}
_LOADING = threading.Lock()
_INTERPRETER = threading.RLock()


class _SerialLaunch(InterpretedFunction):
    """An interpreted kernel whose launches run one at a time in this process (device-function calls inside a
    launch are unchanged: they run under the launch's lock)."""

    def run(self, *args, **kwargs):
        with _INTERPRETER:
            return super().run(*args, **kwargs)


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
    module = _LOADED.get(key)
    if module is not None:
        return module
    with _LOADING:
        module = _LOADED.get(key)
        if module is None:
            module = _import(path, source)
            _LOADED[key] = module
    return module


def _import(path: Path, source: str) -> ModuleType:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != source:
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(source)
        tmp.replace(path)
    if config.debug_level() >= 3:
        print(f"[itnet] triton kernel {path}:\n{source}", file=sys.stderr)
    spec = importlib.util.spec_from_file_location(f"itnet_generated_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    for fn in vars(module).values():
        if type(fn) is InterpretedFunction:
            fn.__class__ = _SerialLaunch
    return module
