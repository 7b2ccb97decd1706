"""The launcher module written into every Triton bundle as ``itnet_bundle.py``: it needs torch and triton only.

``load(bundle_dir)`` returns an ``nn.Module`` that runs the bundle's graph: generic nodes call the ATen op they name
(``aten.name.overload``, resolved in ``torch.ops.aten``; nothing else is callable), transform nodes replay their
recorded kernel launches (kernel files from ``kernels/``, grids, scalar arguments and constexprs from the manifest)
between the ATen ops their Triton wrapper ran (recorded in order). Weights are raw little-endian bytes
(``weights.bin``) read with ``torch.frombuffer``; nothing is unpickled. Kernel files are checked before they are
imported (triton imports and @triton.jit functions only). Sizes are those of the export (the
manifest's ``inputs``).
"""

LAUNCHER = r'''"""Launcher of an itnet Triton bundle (generated; needs torch and triton, not itnet).

    import itnet_bundle
    model = itnet_bundle.load("bundle_dir")   # an nn.Module
    outputs = model(*inputs)                  # a tuple of tensors, in the manifest's output order

Set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU.
"""

import ast
import importlib.util
import json
from pathlib import Path

import torch

_DTYPES = {n: getattr(torch, n) for n in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16",
                                          "int8", "uint8", "bool", "complex64")}


_DENIED = {"__import__", "eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "globals", "locals",
           "vars", "input", "breakpoint", "os", "sys", "subprocess", "importlib", "builtins"}


def _check_kernel_source(path):
    """A kernel file may hold imports of triton (and math), @triton.jit functions and constants, nothing else; names
    that reach the interpreter's host (os, eval, dunders, ...) are refused before the file is imported."""
    tree = ast.parse(path.read_text(), str(path))
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in stmt.names] if isinstance(stmt, ast.Import) else [stmt.module or ""]
            if not all(m == "math" or m == "__future__" or m.split(".")[0] == "triton" for m in mods):
                raise ValueError(f"{path.name}: imports {mods}; a kernel file imports triton only")
        elif isinstance(stmt, ast.FunctionDef):
            if not stmt.decorator_list or not all("jit" in ast.unparse(d) for d in stmt.decorator_list):
                raise ValueError(f"{path.name}: {stmt.name} is not a @triton.jit function")
        elif not isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.Expr)):
            raise ValueError(f"{path.name}: top-level {type(stmt).__name__} is not allowed in a kernel file")
        elif isinstance(stmt, ast.Expr) and not isinstance(stmt.value, ast.Constant):
            raise ValueError(f"{path.name}: a top-level expression runs code on import")
    for node in ast.walk(tree):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name is not None and (name in _DENIED or (name.startswith("__") and name != "__future__")):
            raise ValueError(f"{path.name}: uses {name}, which a kernel never needs")


def _kernel(root, entry, cache):
    key = (entry["file"], entry["name"])
    if key not in cache:
        path = root / "kernels" / entry["file"]
        if path.parent != root / "kernels" or not path.is_file():
            raise ValueError(f"kernel file {entry['file']!r} is not a file of the bundle's kernels/")
        _check_kernel_source(path)
        spec = importlib.util.spec_from_file_location(f"itnet_bundle_kernels.{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cache[key] = getattr(mod, entry["name"])
    return cache[key]


def _literal(a, env, dev):
    if isinstance(a, dict):
        if "v" in a:
            return env[a["v"]]
        if "dtype" in a:
            return _DTYPES[a["dtype"]]
        if "device" in a:
            return dev
        if "list" in a:
            return [_literal(x, env, dev) for x in a["list"]]
        if "float" in a:
            return float(a["float"])
        if "enum" in a:
            return getattr(torch, a["enum"])
        raise ValueError(f"unknown argument {a}")
    return a


def _aten(name):
    ns, op, overload = name.split(".")
    if ns != "aten" or not op.isidentifier() or op.startswith("_debug") or op in ("save", "load", "print"):
        raise ValueError(f"{name} is not an ATen op a bundle may run")
    fn = getattr(getattr(torch.ops.aten, op), overload)
    if not isinstance(fn, torch._ops.OpOverload):
        raise ValueError(f"{name} is not an ATen op")
    return fn


class Bundle(torch.nn.Module):
    def __init__(self, root):
        super().__init__()
        self.root = Path(root)
        self.manifest = json.loads((self.root / "manifest.json").read_text())
        self.graph = json.loads((self.root / "graph.json").read_text())
        blob = (self.root / "weights.bin").read_bytes()
        for i, w in enumerate(self.manifest["weights"]):
            n = w["nbytes"]
            buf = bytearray(blob[w["offset"] : w["offset"] + n])
            t = torch.frombuffer(buf, dtype=_DTYPES[w["dtype"]]) if n else torch.zeros(0, dtype=_DTYPES[w["dtype"]])
            self.register_buffer(f"w{i}", t.reshape(w["shape"]).clone())
        self._kernels = {}
        self._ops = {}

    def forward(self, *inputs):
        spec = self.manifest["inputs"]
        if len(inputs) != len(spec):
            raise ValueError(f"the bundle takes {len(spec)} inputs, not {len(inputs)}")
        for x, s in zip(inputs, spec):
            if list(x.shape) != s["shape"] or str(x.dtype).removeprefix("torch.") != s["dtype"]:
                raise ValueError(f"input {s['name']} must be {s['dtype']}{s['shape']} (the bundle's sizes), "
                                 f"not {x.dtype}{list(x.shape)}")
        dev = inputs[0].device if inputs else self.w0.device
        env = {s["name"]: x for s, x in zip(spec, inputs)}
        for i, w in enumerate(self.manifest["weights"]):
            env[w["value"]] = getattr(self, f"w{i}")
        for node in self.graph:
            if "op" in node:
                fn = self._ops.get(node["op"]) or self._ops.setdefault(node["op"], _aten(node["op"]))
                out = fn(*[_literal(a, env, dev) for a in node["args"]],
                         **{k: _literal(v, env, dev) for k, v in node["kwargs"].items()})
                outs = list(out) if len(node["outputs"]) > 1 or node.get("list") else [out]
            else:  # a kernel launch of a transform, on tensors of the environment
                entry = self.manifest["kernels"][node["launch"]]
                fn = _kernel(self.root, entry, self._kernels)
                fn[tuple(node["grid"])](*[_literal(a, env, dev) for a in node["args"]],
                                        **{k: _literal(v, env, dev) for k, v in node["kwargs"].items()})
                continue
            for name, val in zip(node["outputs"], outs):
                if name:
                    env[name] = val
        return tuple(env[o] for o in self.manifest["outputs"])


def load(root):
    """The bundle at ``root`` as an nn.Module (inference: the forward kernels)."""
    return Bundle(root).train(False)
'''
