"""Cost model of lowerings: FLOPs, bytes moved and an a-priori error, as sympy expressions in the program's symbolic
sizes.

Each ``Lowering`` record (``ir/lowering.py``) carries its cost rule beside it (``ir/lowerings/*.py``): the rule
reads the node's types and attributes and the lowering's typed options and returns a ``Cost``, or None where the
lowering does not apply to that node (``fused`` cannot return attention weights). Approximations also say, through
``fit``, the cheapest options whose a-priori error meets a budget; ``passes/choose_lowering.py`` ranks the results by
roofline time, max(FLOPs / peak FLOP/s, bytes / peak bytes/s), against the target's ``Ceilings``. The error models
are written beside each rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import sympy
import torch

from .core import Node
from .lowering import REGISTRY, LoweringSpec
from .types import TensorType, numel

UNKNOWN = sympy.oo

TensorLookup = Callable[[str], torch.Tensor | None]  # role -> the constant tensor behind it, if the program has one


@dataclass(frozen=True)
class Cost:
    flops: sympy.Expr
    bytes: sympy.Expr
    error: sympy.Expr  # a-priori relative error; 0 exact, oo unknown

    @property
    def exact(self) -> bool:
        return self.error == 0


@dataclass(frozen=True)
class Ceilings:
    """Peak rates of the target; defaults are a 2-core CPU's order of magnitude (measure and pass real ones)."""

    flops_per_s: float = 5e10
    bytes_per_s: float = 1e10

    def seconds(self, cost: Cost, sizes: Mapping[str, int]) -> float:
        return max(evaluate(cost.flops, sizes) / self.flops_per_s, evaluate(cost.bytes, sizes) / self.bytes_per_s)


def cost_of(node: Node, spec: str | LoweringSpec | None = None, tensors: TensorLookup | None = None) -> Cost | None:
    """The cost of ``node`` under ``spec`` (default: its own lowering); None if no rule applies."""
    from .target import tiles_anywhere

    s = node.attrs.lowering if spec is None else spec
    s = s if isinstance(s, LoweringSpec) else LoweringSpec.parse(s)
    rec = REGISTRY.get((node.family, s.name))
    if rec is None or rec.cost is None:
        return None
    return rec.cost(node, rec.parse_options(s.opts, tiles_anywhere(node.family, s.name)), tensors)


def evaluate(expr: sympy.Expr, sizes: Mapping[str, int]) -> float:
    """A size expression at concrete sizes (by symbol name); inf when it is unknown or still symbolic."""
    expr = sympy.sympify(expr)
    val = expr.subs({s: sizes[s.name] for s in expr.free_symbols if s.name in sizes})
    return float(val) if val.is_number else math.inf


def itemsize(t: TensorType) -> int:
    return t.dtype.itemsize


def nbytes(t: TensorType) -> sympy.Expr:
    return numel(t) * itemsize(t)


def role(node: Node, name: str) -> TensorType | None:
    v = node.kwargs.get(name)
    return v.type if v is not None and isinstance(getattr(v, "type", None), TensorType) else None


def out_type(node: Node) -> TensorType:
    t = node.outputs[0].type
    assert isinstance(t, TensorType)
    return t


def cost_table(
    node: Node, sizes: Mapping[str, int], tensors: TensorLookup | None = None, ceilings: Ceilings | None = None
) -> list[dict[str, object]]:
    """One row per lowering with a rule (default options): the expressions and their values at ``sizes``, for
    ``itnet inspect --cost``."""
    ceilings = ceilings or Ceilings()
    rows = []
    for (family, name), rec in REGISTRY.items():
        if family != node.family or rec.cost is None:
            continue
        cost = rec.cost(node, rec.options(), tensors)
        if cost is None:
            continue
        rows.append(
            {
                "lowering": name,
                "flops": cost.flops,
                "bytes": cost.bytes,
                "error": cost.error,
                "flops_at": evaluate(cost.flops, sizes),
                "bytes_at": evaluate(cost.bytes, sizes),
                "error_at": evaluate(cost.error, sizes),
                "seconds_at": ceilings.seconds(cost, sizes),
            }
        )
    return rows
