"""Frontend: a torch model -> ``torch.export`` (non-strict) -> an IR Program of generic ATen-level nodes.

Guarantees: valid IR; one node per ATen call (``getitem`` folded into multi-result nodes); module paths kept as
layer names; user inputs, parameters, buffers and constants kept with their state-dict keys; dynamic sizes become
named symbols (the ``torch.export.Dim`` names where the user gave them). ``aten._assert_tensor_metadata`` checks
are not imported: the IR's value types state the same facts and the verifier checks them. Recognition happens later,
in passes.
"""

from __future__ import annotations

import contextlib
import operator
import re
from collections.abc import Mapping, Sequence

import sympy
import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import ItnetError
from ..ir import treespec
from ..ir.core import Node, Program, Value, Weight
from ..ir.ops import op_name
from ..ir.types import ScalarType, TensorType, Type, canonical_expr, make_symbol, sym
from . import converters
from .specs import suggested_fixes

_LITERALS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def export_model(
    model: torch.nn.Module,
    args: Sequence[object],
    kwargs: Mapping[str, object] | None = None,
    dynamic_shapes: object = None,
) -> Program:
    """Export ``model`` and import the graph. Errors from torch.export become one ItnetError line."""
    kwargs = dict(kwargs or {})
    _settle_rescaling(model)
    with converters.capturing(model) as captured, _no_kv_cache(model):
        try:
            ep = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except ItnetError:
            raise
        except Exception as e:  # torch raises many types here; the user needs one line
            raise ItnetError(f"torch.export could not trace the model ({type(e).__name__}: {_reason(e)})") from e
        return import_exported(ep, _dim_names(ep, dynamic_shapes), captured)


def _settle_rescaling(model: torch.nn.Module) -> None:
    """transformers' RWKV models rescale their weights in place on their first call in a mode (``_rescale_layers``,
    whenever ``layers_are_rescaled == training``); inside export that write is a parameter mutation no program holds.
    Do it first, as the first eager call would, so the export sees the settled weights."""
    for m in model.modules():
        rescale = getattr(m, "_rescale_layers", None)
        if callable(rescale) and getattr(m, "layers_are_rescaled", None) is m.training:
            with torch.no_grad():
                rescale()


@contextlib.contextmanager
def _no_kv_cache(model: torch.nn.Module):
    """A transformers model whose config asks for a KV cache returns a cache object, which no export can hold:
    convert it with ``config.use_cache = False`` (restored afterwards). The CLI does the same. Likewise mixture-of-
    experts layers set to ``grouped_mm`` (transformers' default) run a custom op that loops over a data-dependent
    split on the CPU: they are exported with ``batched_mm``, the same products as one batched matmul (restored)."""
    cfg = getattr(model, "config", None)
    on = getattr(cfg, "use_cache", None) is True
    if on:
        cfg.use_cache = False
    grouped = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "_experts_implementation", None) == "grouped_mm"}  # fmt: skip
    for c in grouped.values():
        c._experts_implementation = "batched_mm"
    try:
        yield
    finally:
        if on:
            cfg.use_cache = True
        for c in grouped.values():
            c._experts_implementation = "grouped_mm"


def _reason(e: BaseException) -> str:
    """torch's first line, the line that says why (guards, specialisations), and its suggested fixes, as one line."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    out = lines[0]
    why = next((ln for ln in lines[1:] if any(w in ln for w in ("Not all values", "specialized", "guard", "- "))), "")
    if why and why not in out:
        out += f" {why[:300]}"
    fixes = suggested_fixes(e)
    if fixes:
        out += f"; torch suggests: {fixes[:300]}"
    else:
        out += "; register a module converter for the failing block or check the example inputs"
    return out


def _dim_names(ep: ExportedProgram, dynamic_shapes: object) -> dict[str, str]:
    """Map torch's symbol names (s0, s27, ...) to the ``Dim`` names the user chose, where it can be read off."""
    if not dynamic_shapes:
        return {}
    users = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    if isinstance(dynamic_shapes, Mapping):
        items = list(dynamic_shapes.items())
    else:  # positional; a ``*args`` group (one tuple of per-input specs) is flattened
        flat: list[object] = []
        for spec in dynamic_shapes:
            group = isinstance(spec, (tuple, list)) and all(s is None or isinstance(s, Mapping) for s in spec)
            flat.extend(spec if group and spec else [spec])
        items = list(zip(users, flat, strict=False))
    out: dict[str, str] = {}
    for name, spec in items:
        node = placeholders.get(name)
        if node is None or spec is None:
            continue
        dims = spec.items() if isinstance(spec, Mapping) else enumerate(spec)
        val = node.meta.get("val")
        for axis, dim in dims:
            dim_name = getattr(dim, "__name__", None)
            if dim_name is None or not isinstance(val, torch.Tensor) or axis >= val.dim():
                continue
            size = val.shape[axis]
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                out[size.node.expr.name] = dim_name
    return out


class _Importer:
    def __init__(self, ep: ExportedProgram, names: dict[str, str], captured: dict[str, object]):
        self.ep = ep
        self.names = names
        self.captured = captured
        self.prog = Program()
        self.env: dict[fx.Node, object] = {}
        self.rename = {sympy.Symbol(k, integer=True, positive=True): make_symbol(v) for k, v in names.items()}
        self.taken: set[str] | None = None  # value names handed out or held by graph nodes (see result_name)

    def expr(self, e: sympy.Expr) -> sympy.Expr:
        return canonical_expr(e).xreplace(self.rename) if self.rename else canonical_expr(e)

    def type_of(self, val: object, where: str) -> Type:
        if isinstance(val, torch.Tensor):
            return TensorType(val.dtype, tuple(self.expr(sym(s)) for s in val.shape))
        if isinstance(val, torch.SymInt):
            return ScalarType("int", self.expr(sym(val)))
        if isinstance(val, bool):
            return ScalarType("bool")
        if isinstance(val, int):
            return ScalarType("int", sympy.Integer(val))
        if isinstance(val, (float, torch.SymFloat)):
            return ScalarType("float")
        if isinstance(val, torch.SymBool):
            return ScalarType("bool")
        raise ItnetError(f"value {where} has unsupported type {type(val).__name__}")

    def arg(self, a: object, node: fx.Node) -> object:
        if isinstance(a, fx.Node):
            v = self.env.get(a)
            if v is None:
                raise ItnetError(f"graph node {a.name} is used before it is defined", layer=_layer(node))
            return v
        if isinstance(a, (list, tuple)):
            return [self.arg(x, node) for x in a]
        if isinstance(a, _LITERALS):
            return a
        raise ItnetError(
            f"argument {a!r} of {node.target} is a {type(a).__name__}, which the IR cannot hold",
            layer=_layer(node),
        )

    def run(self) -> Program:
        sig = self.ep.graph_signature
        specs = {s.arg.name: s for s in sig.input_specs}
        for n in self.ep.graph.nodes:
            if n.op == "placeholder":
                self.placeholder(n, specs[n.name])
            elif n.op == "call_function":
                self.call(n)
            elif n.op == "output":
                self.output(n)
            elif n.op == "get_attr" and isinstance(getattr(self.ep.graph_module, n.target, None), fx.GraphModule):
                self.env[n] = getattr(self.ep.graph_module, n.target)  # a subgraph a higher-order op runs
            else:
                raise ItnetError(f"unsupported graph node kind {n.op} ({n.name}); please report this model")
        for s in sig.output_specs:
            if s.kind != OutputKind.USER_OUTPUT:
                raise ItnetError(
                    f"the model mutates {s.target} during forward ({s.kind.name}); call model.eval() before converting"
                )
        self.prog.in_spec = treespec.to_json(self.ep.call_spec.in_spec)
        self.prog.out_spec = treespec.to_json(self.ep.call_spec.out_spec)
        self.symbols()
        return self.prog

    def symbols(self) -> None:
        for s, rng in self.ep.range_constraints.items():
            e = self.expr(s)
            if not isinstance(e, sympy.Symbol):
                continue
            hi = rng.upper
            hi_val = int(hi) if _finite_int(hi) else None
            self.prog.symbols[e.name] = [int(rng.lower), hi_val]
        used = set()
        for v in self.prog.values():
            if isinstance(v.type, TensorType):
                for d in v.type.shape:
                    used |= {x.name for x in d.free_symbols}
            elif v.type.expr is not None:
                used |= {x.name for x in v.type.expr.free_symbols}
        for name in used - set(self.prog.symbols):
            self.prog.symbols[name] = [0, None]

    def placeholder(self, n: fx.Node, spec) -> None:
        t = self.type_of(n.meta.get("val"), n.name)
        v = Value(_ssa(n.name), t)
        self.env[n] = v
        if spec.kind == InputKind.USER_INPUT:
            self.prog.inputs.append(v)
            return
        kinds = {InputKind.PARAMETER: "param", InputKind.BUFFER: "buffer", InputKind.CONSTANT_TENSOR: "const"}
        kind = kinds.get(spec.kind)
        if kind == "buffer" and spec.persistent is False:
            kind = "const"  # not in the model's state_dict: load_state_dict cannot replace it (a constant, foldable)
        if kind is None:
            raise ItnetError(f"unsupported model input {spec.target} of kind {spec.kind.name}")
        key = spec.target
        tensor = self.ep.state_dict.get(key)
        if tensor is None:
            tensor = self.ep.constants.get(key)
        if not isinstance(tensor, torch.Tensor):
            raise ItnetError(f"model input {key} is not a tensor ({type(tensor).__name__}); it cannot be saved")
        self.prog.weights.append(Weight(v, key, kind))
        self.prog.tensors[key] = tensor.detach()

    def call(self, n: fx.Node) -> None:
        if n.target is operator.getitem:
            src, idx = n.args
            self.env[n] = self.env[src][idx] if isinstance(self.env[src], list) else self.env[src]
            return
        if n.target is torch.ops.aten._assert_tensor_metadata.default:
            return  # a dtype/device assertion that the IR's types already state
        if converters.is_capture_op(n.target):
            self.env[n] = converters.expand_capture(self, n)
            return
        if n.target is torch.ops.higher_order.wrap_with_set_grad_enabled:
            self.env[n] = self.inline(n, enabled=bool(n.args[0]))
            return
        try:
            op = op_name(n.target)
        except ValueError:
            raise ItnetError(
                f"unsupported call {n.target} in the exported graph; register a module converter for its module",
                layer=_layer(n),
            ) from None
        val = n.meta.get("val")
        multi = isinstance(val, (list, tuple))
        vals = list(val) if multi else ([] if val is None else [val])
        names = [self.result_name(n, i) for i in range(len(vals))] if multi else [n.name] * len(vals)
        outs = [Value(_ssa(name), self.type_of(x, n.name)) for name, x in zip(names, vals, strict=True)]
        args = [self.arg(a, n) for a in n.args]
        kwargs = {k: self.arg(a, n) for k, a in n.kwargs.items()}
        self.prog.nodes.append(Node(op, args, kwargs, outs, None, _layer(n)))
        self.env[n] = outs if multi else (outs[0] if outs else None)

    def inline(self, n: fx.Node, enabled: bool) -> list[object]:
        """A ``wrap_with_set_grad_enabled(enabled, subgraph, *args)`` region (a ``@torch.no_grad()`` method inside
        the model) as its ops, in place; under ``enabled=False`` its tensor results are detached, as the region's
        results are. The subgraph's names get its own prefix, so they never collide with the outer graph's."""
        sub = self.env.get(n.args[1])
        if not isinstance(sub, fx.GraphModule):
            raise ItnetError(f"the higher-order op {n.name} runs no subgraph the importer can read", layer=_layer(n))
        prefix = f"{n.args[1].name}_"
        inputs = iter(n.args[2:])
        results: list[object] = []
        for s in sub.graph.nodes:
            if s.op == "placeholder":
                a = next(inputs)
                self.env[s] = self.arg(a, n) if isinstance(a, fx.Node) else a
            elif s.op == "call_function":
                s.name = s.name if s.name.startswith(prefix) else prefix + s.name
                self.call(s)
            elif s.op == "output":
                results = [self.arg(a, n) if isinstance(a, fx.Node) else a for a in s.args[0]]
            else:
                raise ItnetError(f"unsupported node kind {s.op} inside {n.name}; please report this model")
        if enabled:
            return results
        return [self.detached(r, n) if isinstance(r, Value) and isinstance(r.type, TensorType) else r for r in results]

    def detached(self, v: Value, n: fx.Node) -> Value:
        out = Value(_ssa(f"{v.name}_nograd"), v.type)
        self.prog.nodes.append(Node("aten.detach.default", [v], {}, [out], None, _layer(n)))
        return out

    def output(self, n: fx.Node) -> None:
        self.prog.outputs = [self.arg(a, n) for a in n.args[0]]

    def graph(self) -> fx.Graph:
        return self.ep.graph

    def result_name(self, n: fx.Node, i: int) -> str:
        """``{node}_{i}`` for result i of a multi-result node, suffixed where another graph node has that name
        (``sdpa`` results ``sdpa_0, sdpa_1`` against a second node ``sdpa_1``)."""
        if self.taken is None:
            self.taken = {_ssa(x.name) for x in self.graph().nodes}
        name, k = f"{n.name}_{i}", 0
        while _ssa(name) in self.taken:
            k += 1
            name = f"{n.name}_{i}_{k}"
        self.taken.add(_ssa(name))
        return name


def _finite_int(x: object) -> bool:
    """A bound from torch's value ranges that is a plain integer (torch's ``int_oo`` claims to be finite)."""
    try:
        from torch.utils._sympy.numbers import IntInfinity, NegativeIntInfinity

        if isinstance(x, (IntInfinity, NegativeIntInfinity)):
            return False
    except ImportError:  # older torch: sympy.oo is the unbounded marker
        pass
    return bool(getattr(x, "is_finite", False)) and bool(getattr(x, "is_integer", False))


def _ssa(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", name)


def _layer(n: fx.Node) -> str:
    """The module path of the innermost module that produced ``n`` (``encoder.layer.0.attention.self``)."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if path.startswith("_empty_nn_module_stack") else normalize_path(path)


def normalize_path(path: str) -> str:
    """``L['self'].encoder.layer[0]`` and ``encoder.layer.0`` both become ``encoder.layer.0``."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\._modules\.|\._modules\['([^']*)'\]", ".", path)
    return path.strip(".")


def import_exported(ep: ExportedProgram, names: dict[str, str] | None = None, captured: dict | None = None) -> Program:
    return _Importer(ep, names or {}, captured or {}).run()
