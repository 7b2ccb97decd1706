"""Resolve ``auto`` lowerings from the cost model, without measuring. Valid IR in, valid IR out.

Expects: transforms whose lowering is a spec or ``auto`` (a plan has already fixed what the user forced).
Guarantees: no ``auto`` is left. Each ``auto`` transform gets the lowering with the least roofline time
(``ir/cost.py``, at ``sizes`` against ``ceilings``) among those whose a-priori error is within ``error_budget``;
exact lowerings have error 0, so the default budget 0 keeps every layer exact. Options with a free parameter
(Monte Carlo samples, SVD rank) are set to the cheapest value meeting the budget. Families without cost rules keep the
plan pass's exact default. Every choice, with its predicted time and error, is recorded in
``prog.meta["lowering_choices"]`` (layer -> {lowering, seconds, error}), so a plan can be written from it.

Sizes: a symbol takes the value given in ``sizes``, else the example size recorded at conversion, else
``default_size`` clamped into the symbol's range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..ir.core import Node, Program
from ..ir.cost import RULES, Ceilings, TensorLookup, cost_of, evaluate
from ..ir.families import LOWERINGS, parse_lowering
from .plan import resolve_auto

# Among equal predicted times: vendor first, then exact by increasing memory, then the approximations.
PREFERENCE = ("library", "fused", "fft", "dense", "scan", "chunked", "lowrank", "montecarlo")


@dataclass(frozen=True)
class ChooseOptions:
    error_budget: float = 0.0  # largest a-priori relative error per layer; 0: exact lowerings only
    sizes: Mapping[str, int] = field(default_factory=dict)
    ceilings: Ceilings = field(default_factory=Ceilings)
    allowed: tuple[str, ...] | None = None  # lowering names to consider (e.g. what the target backend implements)
    default_size: int = 1024


@dataclass(frozen=True)
class Choice:
    spec: str
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
    keys = {id(w.value): w.key for w in prog.weights}

    def find(role: str):
        v = node.kwargs.get(role)
        key = keys.get(id(v))
        return prog.tensors.get(key) if key is not None else None

    return find


def candidates(node: Node, budget: float, sizes: Mapping[str, int], tensors: TensorLookup, allowed) -> list[str]:
    """Specs worth ranking: every exact lowering with a rule; each approximate one at its cheapest fitting options."""
    out = []
    for name in LOWERINGS.get(node.family, ()):
        rule = RULES.get((node.family, name))
        if rule is None or (allowed is not None and name not in allowed):
            continue
        cost = rule.cost(node, {}, tensors)
        if cost is None:
            continue
        if cost.exact:
            out.append(name)
            continue
        opts = rule.fit(node, budget, sizes, tensors) if rule.fit is not None else None
        if opts is not None:
            out.append(name + ":" + ",".join(f"{k}={v}" for k, v in opts.items()))
    return out


def choose(node: Node, options: ChooseOptions, sizes: Mapping[str, int], tensors: TensorLookup) -> Choice | None:
    best: tuple[float, int, Choice] | None = None
    for spec in candidates(node, options.error_budget, sizes, tensors, options.allowed):
        cost = cost_of(node, spec, tensors)
        if cost is None:
            continue
        error = evaluate(cost.error, sizes)
        if error > options.error_budget:
            continue
        secs = options.ceilings.seconds(cost, sizes)
        name = parse_lowering(spec)[0]
        rank = PREFERENCE.index(name) if name in PREFERENCE else len(PREFERENCE)
        key = (round(secs, 12), rank, Choice(spec, secs, error))
        if best is None or key[:2] < best[:2]:
            best = key
    return None if best is None else best[2]


def choose_lowering(prog: Program, options: ChooseOptions | None = None) -> Program:
    options = options or ChooseOptions()
    sizes = concrete_sizes(prog, options)
    record = prog.meta.setdefault("lowering_choices", {})
    for node in prog.transforms:
        if parse_lowering(node.attrs.lowering)[0] != "auto":
            continue
        choice = choose(node, options, sizes, tensor_lookup(prog, node))
        if choice is None:
            continue  # no rule for this family: resolve_auto gives its exact default below
        node.attrs = node.attrs.replace(lowering=choice.spec)
        record[node.name] = {"lowering": choice.spec, "seconds": choice.seconds, "error": choice.error}
    return resolve_auto(prog)


def step(options: ChooseOptions | None = None) -> tuple[str, Callable[[Program], Program]]:
    """The pipeline entry: ``("choose-lowering", fn)``, to stand where ``resolve-auto`` stands."""
    return ("choose-lowering", lambda p: choose_lowering(p, options))
