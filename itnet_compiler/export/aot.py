"""Ahead-of-time compilation of a Triton bundle's kernels for a GPU target (``sm_90`` for H100/H200), on a machine
without one: Triton compiles for a CUDA target without a driver. Each kernel's first recorded launch is bound by
Triton's own binder for that target (signature, integer specialisations, constexprs, warps, stages), compiled, and
its cubin written to ``binaries/`` with the metadata a loader needs. Runs in a child process without
``TRITON_INTERPRET`` (the interpreter replaces the JIT that compiles).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from .. import config
from ..errors import ItnetError

_ARCH = re.compile(r"sm_(\d+)$")


def compile_bundle(out: Path, manifest: dict, target: str) -> list[dict]:
    m = _ARCH.match(target)
    if not m:
        raise ItnetError(f"--target {target!r} is not a CUDA architecture like sm_90")
    (out / "manifest.json").write_text(json.dumps(manifest))  # the child reads kernels and launches from disk
    env = config.child_env_without("TRITON_INTERPRET")
    cmd = [sys.executable, "-m", "itnet_compiler.export.aot", str(out), m.group(1)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ItnetError(f"compiling the bundle's kernels for {target} failed: {tail[:300]}")
    return json.loads((out / "binaries" / "index.json").read_text())


def _main(root: str, arch: str) -> None:
    import importlib.util

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    out = Path(root)
    manifest = json.loads((out / "manifest.json").read_text())
    graph = json.loads((out / "graph.json").read_text())
    target = GPUTarget("cuda", int(arch), 32)
    backend = make_backend(target)
    first = {}
    for ev in graph:
        if "launch" in ev:
            first.setdefault(ev["launch"], ev)
    (out / "binaries").mkdir(exist_ok=True)
    index = []
    for k, entry in enumerate(manifest["kernels"]):
        ev = first[k]
        path = out / "kernels" / entry["file"]
        spec = importlib.util.spec_from_file_location(f"aot_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fn = getattr(mod, entry["name"])
        kinds = list(entry["signature"].values())

        def value(a, kind):
            if isinstance(a, dict) and "v" in a:  # a tensor: an aligned stand-in of its dtype (the binder reads both)
                return torch.empty(16, dtype=getattr(torch, kind.lstrip("*")))
            if isinstance(a, dict) and "float" in a:
                return float(a["float"])
            return a

        args = [value(a, kinds[i] if i < len(kinds) else "int") for i, a in enumerate(ev["args"])]
        kwargs = {n: value(v, "int") for n, v in ev["kwargs"].items()}
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        kwargs.setdefault("debug", fn.debug or triton.knobs.runtime.debug)
        for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if hasattr(triton.knobs.compilation, name):
                kwargs[name] = getattr(triton.knobs.compilation, name)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        name = f"{entry['name']}_{k}.cubin"
        (out / "binaries" / name).write_bytes(kernel.asm["cubin"])
        meta = kernel.metadata
        index.append({"kernel": k, "name": entry["name"], "file": name, "target": f"sm_{arch}",
                      "num_warps": meta.num_warps, "num_stages": meta.num_stages, "shared": meta.shared,
                      "signature": {str(a): str(b) for a, b in signature.items()}})  # fmt: skip
    (out / "binaries" / "index.json").write_text(json.dumps(index, indent=1))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
