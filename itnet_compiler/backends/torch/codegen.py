"""Torch backend: a Program becomes a ``torch.fx.GraphModule`` (generated Python, no per-node dispatch at run time).

Generic nodes call their ATen op; ``it.transform`` nodes call the torch implementation of their (family, lowering)
with static options baked into the generated code. Weights keep their state-dict keys as module attributes, so
``state_dict()`` of the built module matches the source model's. ``ItnetModule`` restores the original call and
output structure and checks input shapes against the program's (symbolic) types.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ... import config
from ...errors import ItnetError, first_line
from ...ir import treespec
from ...ir.core import Node, Program, Value
from ...ir.ops import resolve_op, returns_list
from ...ir.types import DTYPE_NAMES, TensorType
from .lowerings import implementation
from .runtime import RuntimeState
from .typecheck import RuntimeTypeCheck, check_program


def _set_attr(root: torch.nn.Module, key: str, tensor: torch.Tensor, kind: str) -> None:
    *path, name = key.split(".")
    mod = root
    for p in path:
        if not hasattr(mod, p):
            mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
        if not isinstance(mod, torch.nn.Module):
            raise ItnetError(f"weight key '{key}' nests under the tensor '{p}'; weight keys must form a module tree")
    if hasattr(mod, name):
        raise ItnetError(f"weight key '{key}' is given twice or names an existing module attribute")
    if kind == "param":
        mod.register_parameter(name, torch.nn.Parameter(tensor.clone(), requires_grad=tensor.is_floating_point()))
    else:
        mod.register_buffer(name, tensor.clone(), persistent=kind == "buffer")


DEVICE_ANCHOR = "_itnet_device"
Resolver = Callable[[Node], tuple[Callable[..., object], dict[str, object]]]


def generate(prog: Program, resolve: Resolver = implementation) -> fx.GraphModule:
    """``resolve`` maps an it.transform node to (callable, static kwargs); other backends pass their own."""
    root = torch.nn.Module()
    g = fx.Graph()
    env: dict[Value, fx.Node] = {}
    # FX node name -> the IR node and value it computes (run-time type checks, naming the node a forward fails at).
    declared: dict[str, tuple[Node, Value | None]] = {}
    for v in prog.inputs:
        env[v] = g.placeholder(v.name)
    for w in prog.weights:
        if w.key not in prog.tensors:
            raise ItnetError(f"no tensor for weight '{w.key}'; load the program from its bundle")
        _set_attr(root, w.key, prog.tensors[w.key], w.kind)
        env[w.value] = g.get_attr(w.key)

    # Devices baked into the exported graph (``arange(..., device=cpu)``) become the device of a buffer that moves
    # with the module, so ``module.to("cuda")`` runs every op where the weights are.
    device_node = None
    if any(isinstance(x, torch.device) for n in prog.nodes for x in _leaves((n.args, n.kwargs))):
        root.register_buffer(DEVICE_ANCHOR, torch.empty(0), persistent=False)
        device_node = g.call_function(getattr, (g.get_attr(DEVICE_ANCHOR), "device"))

    def arg(a: object) -> object:
        if isinstance(a, Value):
            return env[a]
        if isinstance(a, list):
            return [arg(x) for x in a]
        if isinstance(a, torch.device) and device_node is not None:
            return device_node
        return a

    for node in prog.nodes:
        if node.is_transform:
            try:
                impl, static = resolve(node)
            except (ValueError, TypeError) as e:  # an option of the lowering spec that its implementation refuses
                raise ItnetError(f"lowering {node.lowering!r}: {e}", layer=node.layer or None) from None
            roles = [r.rstrip("?") for r in node.attrs.roles]
            while roles and roles[-1] not in node.kwargs:
                roles.pop()
            args = tuple(arg(node.kwargs.get(r)) for r in roles)
            call = g.create_node("call_function", impl, args, static, name=node.outputs[0].name)
        else:
            try:
                fn = resolve_op(node.op)
            except ValueError:
                raise ItnetError(f"unknown op `{node.op}`; it cannot be run", layer=node.layer or None) from None
            kwargs = {k: arg(v) for k, v in node.kwargs.items()}
            name = node.outputs[0].name if node.outputs else None
            call = g.create_node("call_function", fn, tuple(arg(a) for a in node.args), kwargs, name=name)
        if len(node.outputs) == 1 and not _returns_list(node):
            env[node.outputs[0]] = call
            declared[call.name] = (node, node.outputs[0])
        else:
            declared[call.name] = (node, None)
            for i, v in enumerate(node.outputs):
                env[v] = item = g.create_node("call_function", operator.getitem, (call, i), name=v.name)
                declared[item.name] = (node, v)
    g.output(tuple(arg(a) for a in prog.outputs))
    gm = fx.GraphModule(root, g, class_name="ItnetGenerated")
    _keep_persistence(root, gm)
    gm.graph.lint()
    gm.meta["itnet_declared"] = declared
    return gm


def _keep_persistence(root: torch.nn.Module, gm: fx.GraphModule) -> None:
    """GraphModule copies buffers as persistent ones: constants (and the device anchor) stay out of the state dict,
    so ``gm.state_dict()`` has the source model's keys and loads into it (and it into ``gm``)."""
    for name, mod in root.named_modules():
        dropped = getattr(mod, "_non_persistent_buffers_set", set())
        if not dropped:
            continue
        target = gm.get_submodule(name) if name else gm
        for buf in dropped:
            if buf in target._buffers:
                target._non_persistent_buffers_set.add(buf)


def _leaves(a: object) -> list[object]:
    if isinstance(a, (list, tuple)):
        return [y for x in a for y in _leaves(x)]
    if isinstance(a, dict):
        return [y for x in a.values() for y in _leaves(x)]
    return [a]


def _returns_list(node) -> bool:
    return len(node.outputs) > 1 if node.is_transform else returns_list(node.op)


class ItnetModule(torch.nn.Module):
    """The built model: same call signature and output structure as the source model."""

    def __init__(self, prog: Program, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm
        self.program = prog
        self._in_spec = treespec.from_json(prog.in_spec) if prog.in_spec is not None else None
        self._out_spec = treespec.from_json(prog.out_spec) if prog.out_spec is not None else None
        self._kw_order = _kwarg_order(prog.in_spec)
        self._checks = [(v.name, v.type) for v in prog.inputs]
        self._ranges = {k: tuple(r) for k, r in prog.symbols.items()}
        # Per input: dtype, then per dim an int (static), a symbol name (bound on first sight) or None (derived).
        self._fast = [
            (t.dtype, [int(d) if d.is_Integer else (d.name if isinstance(d, sympy.Symbol) else None) for d in t.shape])
            if isinstance(t, TensorType)
            else None
            for _, t in self._checks
        ]
        # Positional tensors only, no keywords: the call needs no pytree flattening.
        self._plain = _plain_args(prog.in_spec, len(self._checks))
        # Error estimates of Monte Carlo layers and cached factors (SVD, FFT spectra, learned features) of this module.
        self.runtime = RuntimeState()
        self.runtime.restore(prog.meta.get("fitted") or {}, prog.fitted)  # a calibrated bundle's factors
        self.plan_sizes: dict[str, int] | None = None  # a tuned plan's sizes: other sizes are refused

    @property
    def error_estimates(self) -> dict[str, dict[str, float | int]]:
        """Per layer: the standard-error estimate its Monte Carlo lowering reported on the last forward."""
        return self.runtime.error_table()

    @property
    def code(self) -> str:
        return self.gm.code

    def forward(self, *args: object, **kwargs: object) -> object:
        if self._plain and not kwargs and len(args) == len(self._checks):
            self._check(args)
            out = self._run(args)
            return pytree.tree_unflatten(list(out), self._out_spec) if self._out_spec is not None else out
        if self._kw_order is not None:
            extra = set(kwargs) - set(self._kw_order)
            if extra:
                raise ItnetError(f"unexpected keyword input(s) {sorted(extra)}; the program takes {self._kw_order}")
            kwargs = {k: kwargs[k] for k in self._kw_order if k in kwargs}
        flat, spec = pytree.tree_flatten((args, kwargs))
        if self._in_spec is not None and spec != self._in_spec:
            raise ItnetError(
                f"inputs have structure {spec} but the program was converted for {self._in_spec}; "
                "pass the same arguments as at conversion"
            )
        self._check(flat)
        out = self._run(flat)
        return pytree.tree_unflatten(list(out), self._out_spec) if self._out_spec is not None else out

    def _run(self, flat: list[object] | tuple[object, ...]) -> tuple[object, ...]:
        """The generated graph on checked inputs. A failure inside it becomes one ``ItnetError`` naming the node as
        printed (found by replaying the call node by node); ``ITNET_CHECK_TYPES=1`` checks every result's type."""
        if self.plan_sizes:
            self._check_plan_sizes(flat)
        with self.runtime:
            if config.check_types():
                return RuntimeTypeCheck(self.gm, self._bound_sizes(flat)).run(*flat)
            try:
                return self.gm(*flat)
            except ItnetError:
                raise
            except Exception as e:
                try:
                    with torch.no_grad():
                        RuntimeTypeCheck(self.gm, None, check=False).run(*flat)  # raises, naming the node
                except ItnetError as named:
                    raise named from e
                except Exception:
                    pass
                raise ItnetError(f"running the program failed ({type(e).__name__}: {first_line(e)})") from e

    def _check_plan_sizes(self, flat: list[object] | tuple[object, ...]) -> None:
        bound = self._bound_sizes(flat)
        diff = [f"{k}={bound[k]} (tuned at {v})" for k, v in sorted(self.plan_sizes.items()) if bound.get(k, v) != v]
        if diff:
            raise ItnetError(f"this module's plan was tuned at other sizes: {', '.join(diff)}; tune for these sizes "
                             "(itnet tune --retune) or build without the plan")  # fmt: skip

    def _bound_sizes(self, flat: list[object] | tuple[object, ...]) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for x, fast in zip(flat, self._fast, strict=True):
            if fast is None or not isinstance(x, torch.Tensor):
                continue
            for n, d in zip(x.shape, fast[1], strict=False):
                if isinstance(d, str):
                    sizes.setdefault(d, int(n))
        return sizes

    def _fast_ok(self, flat) -> bool:
        """The common case in plain Python: dtypes, static dims, symbols consistent and in range."""
        bound: dict[str, int] = {}
        for x, fast in zip(flat, self._fast, strict=True):
            if fast is None:
                continue
            dtype, dims = fast
            if not isinstance(x, torch.Tensor) or x.dtype != dtype or x.dim() != len(dims):
                return False
            for n, d in zip(x.shape, dims, strict=True):
                if d is None:
                    continue
                if isinstance(d, int):
                    if d != n:
                        return False
                elif bound.setdefault(d, n) != n:
                    return False
        for name, n in bound.items():
            lo, hi = self._ranges.get(name, (0, None))
            if n < lo or (hi is not None and n > hi):
                return False
        return True

    def _check(self, flat: list[object] | tuple[object, ...]) -> None:
        if len(flat) != len(self._checks):
            raise ItnetError(f"expected {len(self._checks)} inputs, got {len(flat)}")
        if self._fast_ok(flat):
            return
        bound: dict[sympy.Symbol, int] = {}
        for x, (name, t) in zip(flat, self._checks, strict=True):
            if not isinstance(t, TensorType):
                continue
            if not isinstance(x, torch.Tensor):
                raise ItnetError(f"input '{name}' must be a tensor of type {t}, got {type(x).__name__}")
            if x.dtype != t.dtype and x.dim() == t.rank:
                want, got = (str(d).removeprefix("torch.") for d in (t.dtype, x.dtype))
                raise ItnetError(
                    f"input '{name}' has dtype {got} but the program takes {want} ({t}); pass x.to(torch.{want})"
                )
            if x.dtype != t.dtype or x.dim() != t.rank or not _dims_ok(x.shape, t.shape, bound, self._ranges):
                raise ItnetError(
                    f"input '{name}' is {DTYPE_NAMES.get(x.dtype, x.dtype)}{list(x.shape)} but the program expects {t}"
                    f"{_range_text(t, self._ranges)}; convert again with this shape or mark the dimension dynamic"
                )


def _plain_args(in_spec: object, n: int) -> bool:
    """True when the program was called as f(t1, ..., tn) with tensors only and no keyword arguments."""
    if not isinstance(in_spec, dict) or len(in_spec.get("children", [])) != 2:
        return False
    args, kwargs = in_spec["children"]
    return (
        isinstance(args, dict)
        and args.get("children") == ["*"] * n
        and isinstance(kwargs, dict)
        and not kwargs.get("children")
    )


def _dims_ok(shape, dims, bound: dict, ranges: dict) -> bool:
    for n, d in zip(shape, dims, strict=True):
        if d.is_Integer:
            if int(d) != n:
                return False
        elif isinstance(d, sympy.Symbol):
            if bound.setdefault(d, n) != n:
                return False
            lo, hi = ranges.get(d.name, (0, None))
            if n < lo or (hi is not None and n > hi):
                return False
    return True


def _range_text(t: TensorType, ranges: dict) -> str:
    syms = sorted({s.name for d in t.shape for s in d.free_symbols})
    parts = [
        f"{s} in [{ranges[s][0]}, {ranges[s][1] if ranges[s][1] is not None else 'inf'}]" for s in syms if s in ranges
    ]
    return f" ({', '.join(parts)})" if parts else ""


def _kwarg_order(in_spec: object) -> list[str] | None:
    if not isinstance(in_spec, dict) or len(in_spec.get("children", [])) != 2:
        return None
    kw = in_spec["children"][1]
    return list(kw.get("context") or []) if isinstance(kw, dict) else None


def build_torch(prog: Program) -> ItnetModule:
    check_program(prog)  # declared types against what each op produces (a bundle may declare anything)
    return ItnetModule(prog, generate(prog))
