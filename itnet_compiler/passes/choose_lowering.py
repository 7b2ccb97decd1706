"""Resolve ``auto`` lowerings from the cost model, without measuring. Valid IR in, valid IR out.

Expects: transforms whose lowering is a spec or ``auto`` (a plan has already fixed what the user forced).
Guarantees: ``choose_lowering`` leaves no ``auto``. Each ``auto`` transform gets, among the lowerings its target
implements natively (``Target.candidates``), the one with the least roofline time (the record's cost rule, at
``sizes`` against the target's ceilings) whose a-priori error is within ``error_budget``; exact lowerings have error
0, so the default budget 0 keeps every layer exact. Options with a free parameter (Monte Carlo samples, SVD rank) are
set to the cheapest value meeting the budget (the record's ``fit``). Ties go to the target's preference order.
Families without cost rules keep ``auto`` here and get the target's exact default from ``resolve-auto``. Every choice,
with its predicted time and error, is recorded in ``prog.meta["lowering_choices"]`` (layer -> {lowering, seconds,
error}), so a plan can be written from it.

Sizes: a symbol takes the value given in ``sizes``, else the example size recorded at conversion, else
``default_size`` clamped into the symbol's range.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..ir.core import Node, Program
from ..ir.cost import Ceilings, TensorLookup, cost_of, evaluate
from ..ir.lowering import AUTO, REGISTRY, LoweringSpec
from ..ir.target import Target, get_target
from .plan import resolve_auto


@dataclass(frozen=True)
class ChooseOptions:
    error_budget: float = 0.0  # largest a-priori relative error per layer; 0: exact lowerings only
    sizes: Mapping[str, int] = field(default_factory=dict)
    ceilings: Ceilings | None = None  # None: the target's
    allowed: tuple[str, ...] | None = None  # lowering names to consider, within what the target implements
    default_size: int = 1024


@dataclass(frozen=True)
class Choice:
    spec: LoweringSpec
    seconds: float
    error: float


def concrete_sizes(prog: Program, options: ChooseOptions) -> dict[str, int]:
    example = prog.meta.get("example")
    stored = example.get("sizes", {}) if isinstance(example, dict) else {}
    out: dict[str, int] = {}
    for name, (lo, hi) in prog.symbols.items():
        val = options.sizes.get(name, stored.get(name) if isinstance(stored, dict) else None)
        if not isinstance(val, int):
            val = max(int(lo or 0), options.default_size)
            val = val if hi is None else min(val, int(hi))
        out[name] = val
    return {**out, **{k: int(v) for k, v in options.sizes.items()}}


def tensor_lookup(prog: Program, node: Node) -> TensorLookup:
    """role -> the program constant behind that input (weights of a convolution), None for run-time values."""
    keys = {w.value: w.key for w in prog.weights}

    def find(role: str):
        v = node.kwargs.get(role)
        key = keys.get(v) if v is not None and not isinstance(v, list) else None
        return prog.tensors.get(key) if key is not None else None

    return find


def candidates(
    node: Node, budget: float, sizes: Mapping[str, int], tensors: TensorLookup, target: Target, allowed=None
) -> list[LoweringSpec]:
    """Specs worth ranking: every exact lowering with a rule; each approximate one at its cheapest fitting options."""
    out = []
    for name in target.candidates(node.family):
        rec = REGISTRY[(node.family, name)]
        if rec.cost is None or (allowed is not None and name not in allowed) or rec.why_not(node.attrs):
            continue
        cost = rec.cost(node, rec.options(), tensors)
        if cost is None:
            continue
        if rec.exact and cost.exact:
            out.append(LoweringSpec(name))
            continue
        opts = rec.fit(node, budget, sizes, tensors) if rec.fit is not None else None
        if opts is not None:
            out.append(LoweringSpec(name, tuple(opts.items())))  # type: ignore[arg-type]
    return out


def choose(
    node: Node, options: ChooseOptions, sizes: Mapping[str, int], tensors: TensorLookup, target: Target
) -> Choice | None:
    ceilings = options.ceilings or target.ceilings
    best: tuple[float, int, Choice] | None = None
    for spec in candidates(node, options.error_budget, sizes, tensors, target, options.allowed):
        cost = cost_of(node, spec, tensors)
        if cost is None:
            continue
        error = evaluate(cost.error, sizes)
        if error > options.error_budget:
            continue
        secs = ceilings.seconds(cost, sizes)
        key = (round(secs, 12), target.rank(spec.name), Choice(spec, secs, error))
        if best is None or key[:2] < best[:2]:
            best = key
    return None if best is None else best[2]


def choose_auto(prog: Program, options: ChooseOptions | None = None, target: Target | None = None) -> Program:
    """The pipeline step: what the cost model can rank, chosen; the rest left at ``auto``."""
    options = options or ChooseOptions()
    target = target or get_target()
    sizes = concrete_sizes(prog, options)
    record = prog.meta.setdefault("lowering_choices", {})
    for node in prog.transforms:
        if node.attrs.lowering.name != AUTO:
            continue
        choice = choose(node, options, sizes, tensor_lookup(prog, node), target)
        if choice is None:
            continue  # no rule for this family: resolve-auto gives the target's exact default
        node.attrs = node.attrs.replace(lowering=choice.spec)
        record[node.name] = {"lowering": str(choice.spec), "seconds": choice.seconds, "error": choice.error}
    return prog


def choose_lowering(prog: Program, options: ChooseOptions | None = None, target: Target | None = None) -> Program:
    """``choose_auto`` then ``resolve_auto``: no ``auto`` is left."""
    target = target or get_target()
    return resolve_auto(choose_auto(prog, options, target), target)
