"""A self-contained Triton bundle: the planned program with every transform as the kernel launches the Triton
backend makes for it, runnable with torch and triton only (``itnet_bundle.load(dir)``, see ``launcher_source``).

The built Triton module runs once on example inputs while every kernel launch is recorded: the kernel (its
generated source file is copied into ``kernels/``), grid, scalar arguments, constexprs, warps and stages, and each
tensor argument as a view of a transform input or of a scratch buffer. Generic nodes are written as the ATen ops of
the IR. The bundle is then loaded with its own launcher and run against the Triton module on the same inputs; it
is written only if they agree, so a launch sequence that depends on torch work between kernels (which the bundle
does not replay) is refused with one line, never shipped wrong. Sizes are static (those of the example, or of a
tuned plan). ``target="sm_90"`` also compiles each kernel ahead of time for that GPU (``aot.py``).

Layout: kernels/*.py, itnet_bundle.py, manifest.json (kernels with signature, grid, constexprs, warps, stages;
inputs; outputs; weights), graph.json, weights.bin, plan.json, and binaries/ with a target.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import sympy
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from ..errors import ItnetError, first_line
from ..ir.core import Program, Value
from ..ir.ops import resolve_op, returns_list
from .launcher_source import LAUNCHER


class _Trace(TorchDispatchMode):
    """Every ATen op a transform's Triton wrapper runs, and every kernel it launches, in order; tensors are named
    by identity (inputs, results of recorded ops, else constants written into the bundle)."""

    def __init__(self, prefix: str, names: dict[int, str], consts: dict[str, torch.Tensor], rec: _Recorder):
        super().__init__()
        self.prefix, self.names, self.consts, self.rec = prefix, names, consts, rec
        self.events: list[dict] = []
        self.keep: list[torch.Tensor] = []  # recorded tensors stay alive, so their ids stay theirs

    def name_of(self, t: torch.Tensor) -> str:
        key = id(t)
        if key not in self.names:
            name = f"{self.prefix}_c{len(self.consts)}"
            self.consts[name] = t.detach().clone().cpu()
            self.names[key] = name
            self.keep.append(t)
        return self.names[key]

    def enc(self, a: object) -> object:
        if isinstance(a, torch.Tensor):
            return {"v": self.name_of(a)}
        if isinstance(a, (list, tuple)):
            return {"list": [self.enc(x) for x in a]}
        return _encode(a)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            return out  # a value the wrapper reads: the bundle keeps the decision it led to (static sizes)
        enc_args, enc_kwargs = [self.enc(a) for a in args], {k: self.enc(v) for k, v in kwargs.items()}
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        names = []
        for t in outs:
            if isinstance(t, torch.Tensor) and id(t) in self.names:  # an in-place op returns its argument
                names.append(self.names[id(t)])
            elif isinstance(t, torch.Tensor):
                name = f"{self.prefix}_t{len(self.names)}"
                self.names[id(t)] = name
                self.keep.append(t)
                names.append(name)
            else:
                names.append("")
        op = f"aten.{func._schema.name.split('::')[1]}.{func._overloadname}"
        many = isinstance(out, (tuple, list))
        self.events.append({"op": op, "args": enc_args, "kwargs": enc_kwargs, "outputs": names, "list": many})
        return out

    def launch(self, fn, grid, args, kwargs) -> None:
        if callable(grid):
            grid = grid(kwargs)
        grid = [int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,))]
        k = self.rec.kernel(fn, args, kwargs, grid, self.prefix)
        self.events.append({"launch": k, "grid": grid, "args": [self.enc(a) for a in args],
                            "kwargs": {n: self.enc(v) for n, v in kwargs.items()}})  # fmt: skip


@contextlib.contextmanager
def _launches(trace: _Trace):
    """Kernel launches go to ``trace`` and run with the dispatch mode off (the interpreter's own tensor work is not
    the wrapper's)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    saved = [(cls, cls.run) for cls in (JITFunction, InterpretedFunction)]

    def wrap(orig):
        def run(self, *args, grid, warmup=False, **kwargs):
            trace.launch(self, grid, args, kwargs)
            with _disable_current_modes():
                return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

        return run

    for cls, orig in saved:
        cls.run = wrap(orig)
    try:
        yield
    finally:
        for cls, orig in saved:
            cls.run = orig


def _encode(a: object) -> object:
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if a == a and abs(a) != float("inf") else {"float": str(a)}
    if isinstance(a, Value):
        return {"v": a.name}
    if isinstance(a, (list, tuple)):
        return {"list": [_encode(x) for x in a]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, (torch.layout, torch.memory_format)):
        return {"enum": str(a).removeprefix("torch.")}
    raise ItnetError(f"an argument of type {type(a).__name__} cannot be written into a Triton bundle")


def _fn_file(fn) -> Path:
    inner = getattr(fn, "fn", fn)
    return Path(inner.__code__.co_filename)


class _Recorder:
    def __init__(self):
        self.kernels: list[dict] = []
        self.consts: dict[str, torch.Tensor] = {}
        self._kernel_index: dict[tuple, int] = {}

    def kernel(self, fn, args, kwargs, grid, layer) -> int:
        path = _fn_file(fn)
        key = (str(path), fn.__name__)
        if key not in self._kernel_index:
            params = [p.name for p in getattr(fn, "params", [])] or list(getattr(fn, "arg_names", []))
            signature = {}
            for name, a in zip(params, args, strict=False):
                signature[name] = (f"*{str(a.dtype).removeprefix('torch.')}" if isinstance(a, torch.Tensor)
                                   else type(a).__name__)  # fmt: skip
            self._kernel_index[key] = len(self.kernels)
            self.kernels.append({
                "name": fn.__name__, "file": path.name, "layer": layer, "signature": signature,
                "constexprs": {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")
                               and isinstance(v, (int, float, bool, str))},
                "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3), "grid": grid,
                "source": str(path),
            })  # fmt: skip
        return self._kernel_index[key]


def export_triton_planned(prog: Program, out_dir: str | Path, plan: object, sizes, target: str | None) -> dict:
    from ..api import build
    from .onnx_export import example_inputs

    out = Path(out_dir)
    module = build(prog, backend="triton", plan=plan)
    if module.fallbacks:
        layer, why = next(iter(module.fallbacks.items()))
        raise ItnetError(f"runs on torch in the Triton backend ({why}); a bundle holds Triton kernels only: plan a "
                         "Triton lowering for it", layer=layer)  # fmt: skip
    planned = module.program
    flat = example_inputs(planned, sizes)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flat = [x.to(device) for x in flat]
    module = module.to(device)
    rec = _Recorder()
    graph = _record(module, planned, flat, rec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels").mkdir(exist_ok=True)
    for k in rec.kernels:
        shutil.copyfile(k.pop("source"), out / "kernels" / k["file"])
    manifest = _manifest(planned, rec, flat, out)
    (out / "graph.json").write_text(json.dumps(graph))
    (out / "itnet_bundle.py").write_text(LAUNCHER)
    (out / "plan.json").write_text(json.dumps({n.name: n.lowering for n in planned.transforms}, indent=1))
    if target:
        from .aot import compile_bundle

        manifest["binaries"] = compile_bundle(out, manifest, target)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _validate(out, module, flat)
    return manifest


def _record(module, prog: Program, flat: list[torch.Tensor], rec: _Recorder) -> list[dict]:
    """Run the Triton module node by node: generic nodes are written from the IR, transforms as their launches."""
    env: dict[str, object] = {v.name: x for v, x in zip(prog.inputs, flat, strict=True)}
    for w in prog.weights:
        env[w.value.name] = prog.tensors[w.key].to(flat[0].device if flat else "cpu")
    impls = {}
    for fx_node in module.gm.graph.nodes:
        declared = module.gm.meta["itnet_declared"].get(fx_node.name)
        if declared is not None and declared[0].is_transform and fx_node.op == "call_function":
            impls.setdefault(id(declared[0]), (fx_node.target, dict(fx_node.kwargs)))  # the call, not its getitems
    graph: list[dict] = []
    consts = rec.consts
    with torch.no_grad(), module.runtime:
        for node in prog.nodes:
            if not node.is_transform:

                def val(a):
                    return env[a.name] if isinstance(a, Value) else [val(x) for x in a] if isinstance(a, list) else a

                res = resolve_op(node.op)(*[val(a) for a in node.args], **{k: val(v) for k, v in node.kwargs.items()})
                many = len(node.outputs) > 1 or returns_list(node.op)
                for v, r in zip(node.outputs, list(res) if many else [res], strict=False):
                    env[v.name] = r
                graph.append({"op": node.op, "args": [_encode(a) for a in node.args], "list": many,
                              "kwargs": {k: _encode(v) for k, v in node.kwargs.items()},
                              "outputs": [v.name for v in node.outputs]})  # fmt: skip
                continue
            fn, static = impls[id(node)]
            roles = [r.rstrip("?") for r in node.attrs.roles]
            while roles and roles[-1] not in node.kwargs:
                roles.pop()
            role_args = [node.kwargs.get(r) for r in roles]
            args = [[env[x.name] for x in a] if isinstance(a, list) else (env[a.name] if a is not None else None)
                    for a in role_args]  # fmt: skip
            names = {id(t): x.name for a, ta in zip(role_args, args, strict=True)
                     for x, t in zip(a if isinstance(a, list) else [a], ta if isinstance(ta, list) else [ta],
                                     strict=True) if x is not None}  # fmt: skip
            trace = _Trace(node.name.replace(".", "_") or node.outputs[0].name, names, consts, rec)
            with _launches(trace), trace:
                res = fn(*args, **static)
            outs = list(res) if isinstance(res, (tuple, list)) else [res]
            graph += trace.events
            for v, r in zip(node.outputs, outs, strict=True):
                env[v.name] = r
                graph.append({"op": "aten.alias.default", "args": [{"v": trace.name_of(r)}], "kwargs": {},
                              "outputs": [v.name], "list": False})  # fmt: skip
    return graph


def _manifest(prog: Program, rec: _Recorder, flat: list[torch.Tensor], out: Path) -> dict:
    blob = bytearray()
    weights = []
    named = [(w.value.name, w.key, prog.tensors[w.key]) for w in prog.weights]
    named += [(name, name, t) for name, t in rec.consts.items()]  # constants the Triton wrappers made
    for value, key, tensor in named:
        t = tensor.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        weights.append({"value": value, "key": key, "dtype": str(t.dtype).removeprefix("torch."),
                        "shape": list(t.shape), "offset": len(blob), "nbytes": len(raw)})  # fmt: skip
        blob += raw
    (out / "weights.bin").write_bytes(bytes(blob))
    outputs = [v.name for v in _flat_outputs(prog.outputs)]
    return {
        "format": 1, "kernels": rec.kernels, "weights": weights, "outputs": outputs,
        "inputs": [{"name": v.name, "shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
                   for v, x in zip(prog.inputs, flat, strict=True)],
        "symbols": {s: str(sympy.sympify(r)) for s, r in prog.symbols.items()},
        "triton": __import__("triton").__version__, "torch": torch.__version__,
    }  # fmt: skip


def _flat_outputs(outputs) -> list[Value]:
    out: list[Value] = []
    for o in outputs:
        if isinstance(o, Value):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            out += _flat_outputs(o)
        else:
            raise ItnetError(f"a program output of type {type(o).__name__} cannot be bundled")
    return out


def load_launcher(out: Path):
    spec = importlib.util.spec_from_file_location(f"itnet_bundle_{abs(hash(str(out)))}", out / "itnet_bundle.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _validate(out: Path, module, flat: list[torch.Tensor]) -> None:
    """The written bundle, run by its own launcher, against the Triton module on the same inputs."""
    try:
        got = load_launcher(out).load(out).to(flat[0].device if flat else "cpu")(*flat)
    except Exception as e:
        raise ItnetError(f"the written Triton bundle does not run: {first_line(e)[:300]}") from None
    with torch.no_grad(), module.runtime:
        ref = module.gm(*flat)  # the program's flat outputs
    ref_leaves = [r for r in (ref if isinstance(ref, (tuple, list)) else [ref]) if isinstance(r, torch.Tensor)]
    for i, (g, r) in enumerate(zip(got, ref_leaves, strict=True)):
        scale = float(r.abs().max()) if r.numel() else 0.0
        if r.numel() and float((g.float() - r.float()).abs().max()) > 1e-4 * max(scale, 1e-30):
            raise ItnetError(f"the bundle's output {i} differs from the Triton backend's: a transform's launches "
                             "depend on torch work between its kernels, which bundles do not replay yet")  # fmt: skip
