"""Declared result types against what the ops produce: at build on fake tensors, and at run time in debug mode.

The IR states the type of every value, and passes, cost rules and backends trust those types. Text from a bundle may
state anything (a ``relu`` declared ``f32[7]`` of a ``[2, 3]`` input), so ``check_program`` runs every node once on
fake tensors (``FakeTensorMode``: shapes and dtypes only, no data, no allocation) of its inputs' *declared* types at
concrete sizes for the symbols, and compares what comes out with what the node declares: each node is checked on its
own, and a wrong declaration is one ``ItnetError`` naming the layer and the node as printed. Ops whose result depends
on data (``nonzero``, ``.item()``) cannot be run on fakes; their declared types are taken as they are.

``RuntimeTypeCheck`` (``ITNET_CHECK_TYPES=1``) does the same on the real tensors of every forward, with the symbols
bound from the actual inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from ...errors import ItnetError, first_line
from ...ir.core import Node, Program, Value
from ...ir.ops import resolve_op, returns_list
from ...ir.printer import print_node
from ...ir.types import DTYPE_NAMES, ScalarType, TensorType, Type
from .lowerings import implementation

# Exceptions meaning "this op cannot run on fake tensors", not "the program is wrong".
_UNCHECKABLE = (NotImplementedError, torch._subclasses.fake_tensor.UnsupportedFakeTensorException)
_DATA_DEPENDENT = ("DataDependentOutputException", "DynamicOutputShapeException", "UnsupportedOperatorException")


def concrete_sizes(prog: Program) -> dict[str, int]:
    """A size per symbol: the example inputs' (kept by ``itnet convert``), else 16 moved into the symbol's range."""
    example = prog.meta.get("example")
    stored = example.get("sizes", {}) if isinstance(example, dict) else {}
    out: dict[str, int] = {}
    for name, (lo, hi) in prog.symbols.items():
        val = stored.get(name) if isinstance(stored, dict) else None
        size = val if isinstance(val, int) and lo <= val and (hi is None or val <= hi) else max(16, lo)
        out[name] = size if hi is None else min(size, hi)
    return out


Sizes = dict[sympy.Symbol, sympy.Integer]


def _symbols(sizes: dict[str, int]) -> Sizes:
    return {sympy.Symbol(k, integer=True, positive=True): sympy.Integer(v) for k, v in sizes.items()}


def _size_at(expr: sympy.Expr, sizes: Sizes) -> int | None:
    val = sympy.sympify(expr).xreplace(sizes)
    return int(val) if val.is_Integer else None


def _mismatch(t: Type, got: object, sizes: Sizes) -> str | None:
    """Why ``got`` is not a value of type ``t`` at ``sizes``, or None."""
    if isinstance(t, TensorType):
        if not isinstance(got, torch.Tensor):
            return f"it produces a {type(got).__name__}, not a tensor"
        want = [_size_at(d, sizes) for d in t.shape]
        shape_ok = len(want) == got.dim() and all(w is None or w == n for w, n in zip(want, got.shape, strict=False))
        if got.dtype != t.dtype or not shape_ok:
            name = DTYPE_NAMES.get(got.dtype, str(got.dtype))
            return f"it produces {name}{list(got.shape)} where {t} is declared ({want} at these sizes)"
        return None
    assert isinstance(t, ScalarType)
    kinds = {"int": (int,), "float": (float, int), "bool": (bool,)}
    if isinstance(got, torch.Tensor) or not isinstance(got, kinds[t.kind]) or (t.kind == "int" and got is True):
        return f"it produces {type(got).__name__} where {t} is declared"
    if t.kind == "int" and t.expr is not None:
        want = _size_at(t.expr, sizes)
        if want is not None and want != got:
            return f"it produces {got} where {t} is declared ({want} at these sizes)"
    return None


def check_program(prog: Program) -> None:
    """Every node's declared result types against the op run on fake inputs of its declared input types."""
    sizes = _symbols(concrete_sizes(prog))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        env: dict[Value, object] = {}
        for v in [*prog.inputs, *(w.value for w in prog.weights)]:
            env[v] = _fake(v.type, sizes, mode)
        for node in prog.nodes:
            _check_node(node, env, sizes, mode)


def _fake(t: Type, sizes: Sizes, mode: FakeTensorMode) -> object:
    if isinstance(t, ScalarType):
        val = _size_at(t.expr, sizes) if t.expr is not None else None
        return {"int": val if val is not None else 1, "float": 1.0, "bool": False}[t.kind]
    shape = [_size_at(d, sizes) for d in t.shape]
    if any(n is None or n < 0 or n >= 2**63 for n in shape):
        raise ItnetError(f"type {t} has no size at {_sizes_text(sizes)}; fix the size expressions")
    return torch.empty(shape, dtype=t.dtype)


def _check_node(node: Node, env: dict[Value, object], sizes: Sizes, mode: FakeTensorMode) -> None:
    fn, static = _callable(node)

    def arg(a: object) -> object:
        if isinstance(a, Value):
            return env[a]
        if isinstance(a, list):
            return [arg(x) for x in a]
        return a

    got: object = None
    checkable = fn is not None
    if fn is not None:
        if node.is_transform:
            roles = [r.rstrip("?") for r in node.attrs.roles]
            while roles and roles[-1] not in node.kwargs:
                roles.pop()
            call = lambda: fn(*(arg(node.kwargs.get(r)) for r in roles), **static)  # noqa: E731
        else:
            call = lambda: fn(*(arg(a) for a in node.args), **{k: arg(v) for k, v in node.kwargs.items()})  # noqa: E731
        try:
            got = call()
        except ItnetError:
            raise
        except Exception as e:
            if isinstance(e, _UNCHECKABLE) or type(e).__name__ in _DATA_DEPENDENT:
                checkable = False  # e.g. a lowering that reads data (.item()) to choose its path
            else:
                raise ItnetError(
                    f"the op fails on its declared input types ({type(e).__name__}: {first_line(e)}): "
                    f"{print_node(node)}",
                    layer=node.layer or None,
                ) from None
    results = _results(node, got) if checkable else None
    if results is not None and len(results) != len(node.outputs):
        raise ItnetError(
            f"the op produces {len(results)} results where {len(node.outputs)} are declared: {print_node(node)}",
            layer=node.layer or None,
        )
    for i, v in enumerate(node.outputs):
        if results is None:
            env[v] = _fake(v.type, sizes, mode)
            continue
        why = _mismatch(v.type, results[i], sizes)
        if why is not None:
            raise ItnetError(f"%{v.name}: {why}: {print_node(node)}", layer=node.layer or None)
        env[v] = results[i]


def _callable(node: Node) -> tuple[Callable[..., object] | None, dict[str, object]]:
    if node.is_transform:
        try:
            return implementation(node)
        except ItnetError:
            return None, {}
    return resolve_op(node.op), {}


def _results(node: Node, got: object) -> list[object]:
    if not node.outputs:
        return []
    if node.is_transform:
        return list(got) if len(node.outputs) > 1 else [got]  # type: ignore[call-overload]
    if isinstance(got, (tuple, list)) and (len(node.outputs) > 1 or returns_list(node.op)):
        return list(got)
    return [got]


def _sizes_text(sizes: Sizes) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items()) or "static sizes"


class RuntimeTypeCheck(fx.Interpreter):
    """Runs a generated graph node by node and checks each result against the IR's declared type (debug mode);
    also used to name the node where a forward failed."""

    def __init__(self, gm: fx.GraphModule, sizes: dict[str, int] | None, check: bool = True):
        super().__init__(gm)
        self.extra_traceback = False  # FX would append the node and a traceback to our one-line errors
        self.declared: dict[str, tuple[Node, Value | None]] = gm.meta.get("itnet_declared", {})
        self.sizes = _symbols(sizes or {})
        self.check = check

    def run_node(self, n: fx.Node) -> object:
        entry = self.declared.get(n.name)
        try:
            out = super().run_node(n)
        except ItnetError:
            raise
        except Exception as e:
            if entry is None:
                raise
            node = entry[0]
            raise ItnetError(
                f"running {print_node(node)} failed ({type(e).__name__}: {first_line(e)})", layer=node.layer or None
            ) from e
        if self.check and entry is not None and entry[1] is not None:
            node, v = entry
            why = _mismatch(v.type, out, self.sizes)
            if why is not None:
                raise ItnetError(f"%{v.name} at run time: {why}: {print_node(node)}", layer=node.layer or None)
        return out
