"""ONNX export of a planned Program, built from the IR.

The program is rendered 1:1 as an FX graph: each generic node calls its ATen op, each ``it.transform`` node calls
one opaque custom op (``itnet_export::transform``, its index an attribute). torch's exporter translates the generic
nodes with its ATen → ONNX table (torchlib) and emits each transform as a call of a function in the ``itnet`` domain
whose body ``onnx_functions`` builds from the node's family attributes and planned lowering. ``keep_transforms``
keeps those calls and their FunctionProtos (the structure survives, onnxruntime still runs it); otherwise they are
inlined and the model holds standard ops only. Dynamic dims keep the IR's symbol names.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import sympy
import torch
from onnx import defs

from ..errors import ItnetError, first_line
from ..ir.core import Node, Program, Value
from ..ir.types import TensorType
from . import onnx_functions as fns

EXPORT_DOMAIN = "itnet.export"  # placeholder calls during the export; renamed to the ``itnet`` domain afterwards
ITNET_DOMAIN = "itnet"
MIN_OPSET, MAX_OPSET = 18, 24
_TYPES = ["float", "double", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool", "complex64"]
_MAX_OUTPUTS = 4


def _register_schemas() -> None:
    """``Call{k}``: any inputs, k outputs; torch's exporter needs a schema to know how many outputs a node has."""
    fp, opt = defs.OpSchema.FormalParameter, defs.OpSchema.FormalParameterOption
    for k in range(1, _MAX_OUTPUTS + 1):
        if defs.has(f"Call{k}", EXPORT_DOMAIN):
            continue
        tys = [f"tensor({t})" for t in _TYPES]
        defs.register_schema(
            defs.OpSchema(
                f"Call{k}",
                EXPORT_DOMAIN,
                1,
                inputs=[fp("xs", "V", param_option=opt.Variadic, is_homogeneous=False, min_arity=0)],
                outputs=[fp(f"y{i}", f"T{i}") for i in range(k)],
                type_constraints=[("V", tys, ""), *((f"T{i}", tys, "") for i in range(k))],
                attributes=[defs.OpSchema.Attribute("index", defs.OpSchema.AttrType.INT, "")],
            )
        )


@dataclass
class _Entry:
    node: Node
    inputs: list[Value]  # the present tensor inputs, flattened in role order
    impl: object  # the torch lowering (eager runs of the custom op)
    static: dict[str, object]


_ACTIVE: dict[int, _Entry] = {}


@torch.library.custom_op("itnet_export::transform", mutates_args=())
def _transform(xs: list[torch.Tensor], index: int) -> list[torch.Tensor]:
    e = _ACTIVE[index]
    out = e.impl(*_role_args(e.node, xs), **e.static)
    return [t.clone() for t in (out if isinstance(out, (tuple, list)) else (out,))]


@_transform.register_fake
def _(xs: list[torch.Tensor], index: int) -> list[torch.Tensor]:
    e = _ACTIVE[index]
    env: dict[sympy.Symbol, object] = {}
    for v, x in zip(e.inputs, xs, strict=True):
        for d, n in zip(v.type.shape, x.shape, strict=True):
            if isinstance(d, sympy.Symbol):
                env.setdefault(d, n)
    return [x.new_empty([_size(d, env) for d in o.type.shape], dtype=o.type.dtype) for o in e.node.outputs]


def _size(d: sympy.Expr, env: dict[sympy.Symbol, object]) -> object:
    """A (symbolic) size from the inputs' sizes: sympy arithmetic evaluated on torch SymInts."""
    if d.is_Integer:
        return int(d)
    if isinstance(d, sympy.Symbol):
        if d not in env:
            raise ItnetError(f"output size {d} is not a size of any input")
        return env[d]
    if isinstance(d, sympy.Add):
        out = 0
        for a in d.args:
            out = out + _size(a, env)
        return out
    if isinstance(d, sympy.Mul):
        out = 1
        num = [a for a in d.args if not (a.is_Rational and not a.is_Integer)]
        for a in num:
            out = out * _size(a, env)
        for a in d.args:
            if a.is_Rational and not a.is_Integer:
                out = out * int(a.p) // int(a.q)
        return out
    if isinstance(d, sympy.floor) and isinstance(d.args[0], sympy.Mul):
        return _size(d.args[0], env)
    if isinstance(d, sympy.Max):
        return max(_size(a, env) for a in d.args)
    raise ItnetError(f"cannot export the symbolic size {d}")


def _role_args(node: Node, xs: list[torch.Tensor]) -> list[object]:
    it = iter(xs)
    out: list[object] = []
    for r in (r.rstrip("?") for r in node.attrs.roles):
        a = node.kwargs.get(r)
        out.append([next(it) for _ in a] if isinstance(a, (list, tuple)) else (next(it) if a is not None else None))
    while out and out[-1] is None:  # trailing absent roles are not passed, as the torch backend calls lowerings
        out.pop()
    return out


def _flat_inputs(node: Node) -> list[Value]:
    out: list[Value] = []
    for r in (r.rstrip("?") for r in node.attrs.roles):
        a = node.kwargs.get(r)
        if isinstance(a, (list, tuple)):
            out += list(a)
        elif isinstance(a, Value):
            out.append(a)
    return out


def transform_call(*role_args: object, index: int) -> object:
    """What the rendered FX graph calls for transform ``index``."""
    xs = [t for a in role_args for t in (a if isinstance(a, (list, tuple)) else (a,)) if t is not None]
    out = torch.ops.itnet_export.transform(xs, index)
    return out[0] if len(out) == 1 else tuple(out)


def dynamic_shapes(values: list[Value], symbols: dict[str, list[int | None]]) -> tuple[object, ...]:
    """torch.export ``dynamic_shapes`` for ``values``: one Dim per IR symbol (its range), derived sizes AUTO."""
    dims: dict[str, torch.export.Dim] = {}
    out = []
    for v in values:
        if not isinstance(v.type, TensorType):
            out.append(None)
            continue
        spec = {}
        for i, d in enumerate(v.type.shape):
            if isinstance(d, sympy.Symbol):
                lo, hi = symbols.get(d.name, [2, None])
                if d.name not in dims:
                    dims[d.name] = torch.export.Dim(d.name, min=max(int(lo or 0), 2), max=int(hi) if hi else None)
                spec[i] = dims[d.name]
            elif not d.is_Integer:
                spec[i] = torch.export.Dim.AUTO
        out.append(spec or None)
    return tuple(out)


@contextlib.contextmanager
def quiet():
    """torch's exporter prints progress and logs warnings about optional packages: keep the CLI's output clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        sink = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _searchsorted(sorted_sequence, values, out_int32: bool = False, right: bool = False, side=None, sorter=None):
    """aten.searchsorted (which torch's ONNX table lacks; the sampling lowerings use it): the count of sorted
    entries below (``right``: not above) each value, by one broadcast comparison."""
    from onnxscript import opset18 as op

    seq = op.Unsqueeze(sorted_sequence, [-2])
    val = op.Unsqueeze(values, [-1])
    hit = op.LessOrEqual(seq, val) if right or side == "right" else op.Less(seq, val)
    count = op.ReduceSum(op.Cast(hit, to=onnx.TensorProto.INT64), [-1], keepdims=0)
    return op.Cast(count, to=onnx.TensorProto.INT32) if out_int32 else count


def torch_to_onnx(module: torch.nn.Module, args: tuple, dyn: tuple, opset: int, what: str, table=None):
    """``torch.onnx.export`` (the dynamo exporter) to a ModelProto; its failure becomes one ItnetError line that
    keeps torch's reason."""
    table = {torch.ops.aten.searchsorted.Tensor: _searchsorted, **(table or {})}
    try:
        with quiet():
            ep = torch.export.export(module, args, dynamic_shapes=dyn, strict=False)
            prog = torch.onnx.export(
                ep, custom_translation_table=table, opset_version=opset, dynamo=True, verbose=False, optimize=True
            )
            return prog.model_proto  # serialising logs about values it could not type: inside quiet()
    except ItnetError:
        raise
    except Exception as e:
        raise ItnetError(f"{what} does not export to ONNX: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    """The innermost useful line of torch's (chained, multi-line) export error."""
    while e.__cause__ is not None and not isinstance(e, ItnetError):
        e = e.__cause__
    return first_line(e)[:400]


def example_inputs(prog: Program, sizes: dict[str, int] | None = None) -> list[torch.Tensor]:
    """Inputs of the program's types at its example sizes (``sizes`` override them), flattened: floats random, ints
    zero (a valid token id and position), bools True. Only their shapes shape the exported graph."""
    from ..report import example_sizes

    at = {**example_sizes(prog), **(sizes or {})}
    gen = torch.Generator().manual_seed(0)
    out = []
    for v in prog.inputs:
        if not isinstance(v.type, TensorType):
            raise ItnetError(f"input '{v.name}' is a {v.type}; ONNX graphs take tensor inputs only")
        shape = [int(d.subs({s: at[s.name] for s in d.free_symbols if s.name in at})) for d in v.type.shape]
        dt = v.type.dtype
        if dt.is_floating_point or dt.is_complex:
            out.append(torch.randn(shape, generator=gen, dtype=dt))
        else:
            out.append((torch.ones if dt == torch.bool else torch.zeros)(shape, dtype=dt))
    return out


def export_onnx(
    planned: Program,
    path: str | Path | None = None,
    *,
    opset: int = 18,
    keep_transforms: bool = False,
    fallback: str | None = None,
    sizes: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """``planned`` (every lowering resolved, ``itc.plan_program``) as an ONNX model; written to ``path`` if given.

    ``fallback``: what to do with a transform no ONNX emitter maps: None (one ItnetError naming the layer and the
    op), ``"trace"`` (its torch lowering decomposed into standard ops at the example sizes)."""
    from ..backends.torch.codegen import generate
    from ..backends.torch.lowerings import implementation

    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise ItnetError(f"--opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    _register_schemas()
    _refuse_complex(planned)
    planned = _avoid_exporter_names(planned)
    flat = example_inputs(planned, sizes)
    entries: dict[int, _Entry] = {}
    index_of: dict[int, int] = {}

    def resolve(node: Node):
        i = len(entries)
        impl, static = implementation(node)
        entries[i] = _Entry(node, _flat_inputs(node), impl, static)
        index_of[id(node)] = i
        return transform_call, {"index": i}

    gm = generate(planned, resolve)
    from ..backends.torch.runtime import RuntimeState

    state = RuntimeState()
    state.restore(planned.meta.get("fitted") or {}, planned.fitted)
    _ACTIVE.clear()
    _ACTIVE.update(entries)
    try:
        # Every transform's inputs at the example sizes (one eager run): what a traced function body is built from.
        with state, torch.no_grad():
            seen = _capture(gm, flat, entries)
            bodies = fns.FunctionBuilder(int(opset), planned.symbols, fallback, state)
            names = {i: bodies.add(e.node, seen[i]) for i, e in entries.items()}
        table = {torch.ops.itnet_export.transform.default: _translator(names, entries)}
        with state:
            model = torch_to_onnx(
                gm, tuple(flat), dynamic_shapes(planned.inputs, planned.symbols), int(opset), "the program", table
            )
    finally:
        _ACTIVE.clear()
    from .onnx_post import finish

    calls = {i: (names[i], e.node) for i, e in entries.items()}
    model = finish(model, planned, bodies.functions, list(bodies.nested.values()), calls, keep_transforms, int(opset))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    return model


def _avoid_exporter_names(prog: Program) -> Program:
    """torch's exporter names its own constants val_<n>: weights called so (an imported ONNX model's) are renamed
    in the exported copy."""
    clash = [w for w in prog.weights if re.fullmatch(r"val_\d+", w.key)]
    if not clash:
        return prog
    dup = prog.clone()
    for w in dup.weights:
        if re.fullmatch(r"val_\d+", w.key):
            dup.tensors[f"w_{w.key}"] = dup.tensors.pop(w.key)
            w.key = f"w_{w.key}"
    return dup


def _refuse_complex(prog: Program) -> None:
    """ONNX runtimes compute no complex numbers: a program that does (S4D building its kernel from complex A, B, C
    over the input's length) is refused in one line naming the first such layer and op."""
    for node in prog.nodes:
        for v in node.outputs:
            if isinstance(v.type, TensorType) and v.type.dtype.is_complex:
                raise ItnetError(
                    f"computes complex values ({v.name} = {node.op}), which ONNX has no arithmetic for; export to "
                    "MLIR or a Triton bundle instead, or rewrite the layer in real arithmetic",
                    layer=node.layer or None,
                )


def _capture(gm: torch.fx.GraphModule, flat: list[torch.Tensor], entries: dict[int, _Entry]) -> dict[int, list]:
    """Run the rendered graph once, recording each transform's input tensors."""
    seen: dict[int, list[torch.Tensor]] = {}

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is transform_call:
                i = kwargs["index"]
                seen[i] = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)) if t is not None]
            return super().call_function(target, args, kwargs)

    Recorder(gm).run(*flat)
    return seen


def _translator(names: dict[int, str], entries: dict[int, _Entry]):
    from onnxscript import values

    opset = values.Opset(EXPORT_DOMAIN, 1)

    def translate(xs, index: int):
        k = len(entries[index].node.outputs)
        if k > _MAX_OUTPUTS:
            raise ItnetError(f"a transform with {k} outputs cannot be exported", layer=entries[index].node.layer)
        out = getattr(opset, f"Call{k}")(*xs, index=index)
        return list(out) if k > 1 else [out]

    return translate
