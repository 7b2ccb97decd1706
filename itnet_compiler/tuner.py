"""``itc.tune``: per layer, the fastest lowering whose output stays within an accuracy budget, measured on the user's
own inputs, and a ``Plan`` that remembers the choice.

1. The program is planned exact (the target's defaults) and run once on the calibration inputs with every transform
   spied on: each layer's inputs and exact output are kept (``capture``).
2. Candidates per layer: every lowering the target runs that admits the layer, at its defaults and at each tunable
   option moved alone through its ``tune`` space, plus Triton tile configurations on a GPU (``candidate_specs``:
   the registry records are the search space); with budget 0 only exact lowerings. The cost model orders the
   approximations and the ``keep`` predicted fastest are measured (``prune``).
3. Each candidate runs on the captured inputs of its layer: time (median of ``repeat`` calls after a warm-up, wall
   clock on the CPU, CUDA-synchronised on a GPU; the spread is reported), error against the layer's exact output,
   and the layer's own estimate where it reports one.
4. Per layer the Pareto front of (time, error) among approximations faster than its fastest exact candidate is
   kept (up to ``per_layer``, own error within 20× the budget: residual streams dilute a layer's error). Errors
   compose, so this is measured, not assumed: each kept approximation runs end to end with every other layer exact,
   and its effect on the model's output is its price. The budget is shared out greedily (most time saved per unit
   of squared error, errors taken to add in quadrature) within ``margin`` × budget, each error the worst over batches.
5. The plan then runs on held-out inputs (the calibration inputs when none are given) against the exact program;
   while the end-to-end error exceeds the budget, the layer that gives up the least time per unit of error removed
   backs off to its next more accurate choice, until the plan fits (at worst, all exact).

The ``Plan`` is JSON: per layer the spec and its measurements, plus the device, library versions, the symbol sizes it
was tuned at and the program's hash. ``build(prog, plan=...)`` refuses a plan made for another program, device or
versions, and the built module refuses inputs of other sizes, each with one line saying what differs.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

from .errors import ItnetError, first_line
from .ir.core import Node, Program
from .ir.lowering import REGISTRY, LoweringSpec
from .ir.target import get_target
from .plan import Plan, device_name, literal_plan, program_hash, versions

Batch = object  # a tensor, a tuple of positional inputs or a dict of keyword inputs


# ---------------------------------------------------------------------------------------------- the search space


# Triton tile configurations tried one option at a time on a GPU (the interpreter's timings mean nothing).
TILE_GRID: dict[str, tuple[int, ...]] = {
    "block_m": (64, 128),
    "block_n": (32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4),
}


def candidate_specs(
    node: Node, backend: str, budget: float, per_option: int = 3, tiles: bool | None = None
) -> list[str]:
    """The lowering specs the tuner measures for ``node``: each lowering the target runs (natively or handed to
    another target, such as ``library`` on Triton) that admits it, at its defaults and with each tunable option
    moved alone through its ``tune`` space (numbers: up to ``per_option`` points spread geometrically over the
    interval; strings: every value); with budget 0 only exact lowerings. On a GPU Triton target, each lowering's tile
    options (``TILE_GRID``) are moved alone as well (``tiles``: default, only there)."""
    target = get_target(backend)
    if tiles is None:
        tiles = target.backend == "triton" and torch.cuda.is_available()
    out: list[str] = []
    for name in target.choices(node.family):
        rec = REGISTRY[(node.family, name)]
        if budget <= 0 and not rec.exact:
            continue
        if rec.why_not(node.attrs) is None:
            out.append(name)
        # a lowering whose defaults the node refuses (the mlp kernel has no ``favor`` features) may still admit a move
        defaults = rec.options()
        moves: list[tuple[str, object]] = []
        for f in getattr(type(defaults), "__dataclass_fields__", {}).values():
            space = f.metadata.get("tune")
            if space:
                default = getattr(defaults, f.name)
                moves += [(f.name, v) for v in _points(space, default, per_option) if v != default]
        if tiles:
            moves += [(t, v) for t in sorted(target.tiles(node.family, name)) for v in TILE_GRID.get(t, ())]
        for key, val in moves:
            spec = f"{name}:{key}={val}"
            try:
                opts = rec.make(LoweringSpec.parse(spec), node.name, extra=target.tiles(node.family, name))
            except ItnetError:
                continue  # a value the record refuses together with the others' defaults
            if rec.why_not(node.attrs, opts) is None:
                out.append(spec)
    return list(dict.fromkeys(out))


def prune(
    node: Node, specs: list[str], sizes: dict[str, int], budget: float, keep: int, slower: float = 8.0
) -> list[str]:
    """The cost model's cut: the exact candidates predicted within ``slower``× the fastest exact one and moving
    at most 64× the bytes of the leanest (the dense lowering at long sequences is not worth its memory), then the
    ``keep`` approximations predicted fastest among those predicted faster than that and whose a-priori error
    (where the record models one) is not far past the budget. Measured, not trusted: the cut only chooses what
    gets measured."""
    from .ir.cost import Ceilings, cost_of, evaluate

    ceil = Ceilings()
    exact, approx = [], []
    for spec in specs:
        cost = cost_of(node, spec)
        secs = float(ceil.seconds(cost, sizes)) if cost is not None else math.inf
        if REGISTRY[(node.family, LoweringSpec.parse(spec).name)].exact:
            moved = float(evaluate(cost.bytes, sizes)) if cost is not None else math.inf
            exact.append((secs, moved, spec))
            continue
        err = evaluate(cost.error, sizes) if cost is not None and cost.error is not None else math.inf
        if math.isfinite(err) and err > 20 * budget:
            continue
        approx.append((secs, spec))
    best = min((t for t, _, _ in exact), default=math.inf)
    least = min((b for _, b, _ in exact), default=math.inf)
    kept = [s for t, b, s in exact if not (t > slower * best or b > 64 * least)]  # unknown costs are measured
    approx.sort(key=lambda t: t[0])
    return kept + [s for t, s in approx if not t > slower * best][:keep]


def _points(space: tuple, default: object, n: int) -> list[object]:
    if all(isinstance(x, str) for x in space) or len(space) != 2:
        return list(space)
    lo, hi = space
    if isinstance(default, bool) or not isinstance(lo, (int, float)):
        return list(space)
    if lo <= 0:
        return [lo, hi] if n > 1 else [hi]
    pts = [lo * (hi / lo) ** (i / max(n - 1, 1)) for i in range(n)]
    if isinstance(default, int):
        return sorted({int(round(2 ** round(math.log2(p)))) for p in pts if lo <= 2 ** round(math.log2(p)) <= hi})
    return sorted({round(p, 6) for p in pts})


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class Capture:
    """One layer's calls on the calibration inputs: (args, static kwargs) and the exact output of each."""

    node: Node
    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    outputs: list[object] = field(default_factory=list)


def resolver(backend: str) -> Callable[[Node], tuple[Callable[..., object], dict[str, object]]]:
    if get_target(backend).backend == "triton":
        from .backends.triton.codegen import TritonBuild

        return TritonBuild().resolve
    from .backends.torch.registry import implementation

    return implementation


def run_batch(module: torch.nn.Module, batch: Batch) -> object:
    if isinstance(batch, dict):
        return module(**batch)
    return module(*(batch if isinstance(batch, tuple) else (batch,)))


def capture(planned: Program, batches: list[Batch], backend: str) -> dict[str, Capture]:
    """Run the (exactly planned) program on ``batches`` with every transform spied on."""
    from .backends.torch.codegen import ItnetModule, generate

    resolve = resolver(backend)
    caps: dict[str, Capture] = {}
    keys = layer_keys(planned)

    def spying(node: Node):
        fn, static = resolve(node)
        cap = caps.setdefault(keys[id(node)], Capture(node))

        def spy(*args, **kw):
            out = fn(*args, **kw)
            cap.calls.append((tuple(_detached(a) for a in args), dict(kw)))
            cap.outputs.append(_detached(out))
            return out

        return spy, static

    module = ItnetModule(planned, generate(planned, spying))
    with torch.no_grad():
        for b in batches:
            run_batch(module, b)
    return caps


def layer_keys(prog: Program) -> dict[int, str]:
    """A plan key per transform: its layer, or its output's SSA name where layers repeat (a module called twice)."""
    count: dict[str, int] = {}
    for n in prog.transforms:
        count[n.layer] = count.get(n.layer, 0) + 1
    return {id(n): n.layer if n.layer and count[n.layer] == 1 else n.outputs[0].name for n in prog.transforms}


def _detached(x: object) -> object:
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, x)


def rel_error(got: list[object], want: list[object]) -> float:
    num = den = 0.0
    for g, w in zip(got, want, strict=True):
        for a, b in zip(pytree.tree_leaves(g), pytree.tree_leaves(w), strict=True):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                num += float((a.double() - b.double()).pow(2).sum())
                den += float(b.double().pow(2).sum())
    if not math.isfinite(num):
        return math.inf
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def worst_error(got: list[object], want: list[object]) -> float:
    """The largest relative error over batches: a plan must hold on each batch, not on their pooled norm."""
    return max((rel_error([g], [w]) for g, w in zip(got, want, strict=True)), default=0.0)


def timed(fn: Callable[[], object], repeat: int, device: torch.device | None = None) -> tuple[float, float]:
    """(median seconds, relative spread (max - min) / median) of ``repeat`` calls after one warm-up."""
    cuda = device is not None and device.type == "cuda"
    fn()
    times = []
    for _ in range(max(1, repeat)):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return med, (max(times) - min(times)) / med if med > 0 else 0.0


def measure(cap: Capture, spec: str, backend: str, repeat: int) -> dict[str, object]:
    """One candidate on one layer's captured calls: time, error against the exact outputs, own estimate."""
    from .backends.torch.runtime import RuntimeState

    node = cap.node
    trial = Node(node.op, node.args, node.kwargs, node.outputs, node.attrs.replace(lowering=LoweringSpec.parse(spec)),
                 node.layer)  # fmt: skip
    row: dict[str, object] = {"spec": spec, "exact": REGISTRY[(node.family, trial.attrs.lowering.name)].exact}
    try:
        fn, static = resolver(backend)(trial)
        state = RuntimeState()
        device = next((a.device for a in cap.calls[0][0] if isinstance(a, torch.Tensor)), None)
        with torch.no_grad(), state:
            outs = [fn(*args, **{**kw, **static}) for args, kw in cap.calls]  # also fits what learns from data
            seconds, spread = timed(lambda: [fn(*a, **{**kw, **static}) for a, kw in cap.calls], repeat, device)
        row.update(seconds=seconds, spread=spread, error=rel_error(outs, cap.outputs))
        est = state.errors.get(node.name)
        row["estimate"] = est.rel if est is not None else None
    except ItnetError as e:
        row.update(seconds=math.inf, spread=0.0, error=math.inf, estimate=None, failed=str(e))
    except Exception as e:  # a candidate that fails on these inputs is not a choice; the tuner goes on
        row.update(seconds=math.inf, spread=0.0, error=math.inf, estimate=None, failed=f"{type(e).__name__}: "
                   f"{first_line(e)}")  # fmt: skip
    return row


# ---------------------------------------------------------------------------------------------- the tuner


Progress = Callable[[str, str, int, int], None]  # (layer, what, steps done, steps in all)


def tune(
    prog: Program,
    calib_inputs: Batch | list[Batch],
    budget: float = 1e-2,
    backend: str = "torch",
    time_limit: float | None = None,
    held_out: Batch | list[Batch] | None = None,
    repeat: int = 5,
    progress: Progress | None = None,
    keep: int = 16,
    per_layer: int = 4,
    margin: float = 0.8,
) -> Plan:
    """The fastest plan whose end-to-end relative error on ``held_out`` (else the calibration inputs) stays within
    ``budget`` (0: exact lowerings only), measured per layer on ``calib_inputs`` (see the module docstring).
    ``keep``: approximations measured per layer after the cost model's cut; ``per_layer``: approximations per layer
    whose end-to-end effect is measured; ``time_limit`` (seconds) stops measuring and plans with what was measured;
    ``margin``: the share of the budget the calibration errors may fill (the rest is headroom for inputs unlike
    them; the held-out check holds the plan to the whole budget on every batch)."""
    from .api import build, plan_program

    if budget < 0 or not math.isfinite(budget):
        raise ItnetError(f"budget must be a finite relative error ≥ 0, not {budget}")
    if not 0 < margin <= 1:
        raise ItnetError(f"margin must be in (0, 1], not {margin}")
    batches = calib_inputs if isinstance(calib_inputs, list) else [calib_inputs]
    checks = held_out if isinstance(held_out, list) else ([held_out] if held_out is not None else batches)
    if not batches or not checks:
        raise ItnetError("tune needs at least one batch of calibration inputs (and of held-out inputs, if given)")
    start = time.perf_counter()
    over = (lambda: False) if time_limit is None else (lambda: time.perf_counter() - start > time_limit)
    exact = plan_program(prog, None, backend)
    caps = capture(exact, batches, backend)
    keys = layer_keys(exact)
    sizes = _sizes(exact, batches[0])
    specs = {keys[id(n)]: prune(n, candidate_specs(n, backend, budget), sizes, budget, keep) for n in exact.transforms}
    steps = Steps(progress, sum(len(v) for v in specs.values()) + (per_layer + 1) * len(specs) + 2)
    notes: list[str] = []
    rows: dict[str, list[dict]] = {}
    for n in exact.transforms:  # 1. every candidate on its layer's captured inputs
        key = keys[id(n)]
        cap = caps.get(key)
        if cap is None or not cap.calls:
            notes.append(f"{key}: not reached by the calibration inputs; kept at {n.lowering}")
            steps.skip(len(specs[key]))
            continue
        rows[key] = []
        for spec in specs[key]:
            if over():
                notes.append(f"{key}: time limit reached before {spec}")
                steps.skip(1)
                continue
            steps.show(key, spec)
            rows[key].append(measure(cap, spec, backend, repeat))
    exact_specs = {keys[id(n)]: str(n.attrs.lowering) for n in exact.transforms}
    cap_err = 20 * budget  # a layer's own error may exceed the budget: the residual stream dilutes it
    frontier = {k: _frontier(r, cap_err, per_layer) for k, r in rows.items()}
    base = {k: (f[-1]["spec"] if f else exact_specs[k]) for k, f in frontier.items()}
    exact_specs.update(base)  # each layer's fastest exact lowering is the reference it starts from

    def module(changes: dict[str, str]) -> torch.nn.Module:
        return build(prog, backend, literal_plan({**exact_specs, **changes}))

    def outputs(mod: torch.nn.Module, inputs: list[Batch]) -> list[object]:
        with torch.no_grad():
            return [_detached(run_batch(mod, b)) for b in inputs]

    steps.show("", "exact reference")
    ref = module({})
    want_calib = outputs(ref, batches)
    want = want_calib if checks is batches else outputs(ref, checks)
    for key, f in frontier.items():  # 2. each approximation's own end-to-end effect, the others exact
        for r in f:
            if r["exact"]:
                r["end_to_end"] = 0.0
                continue
            if over():
                r["end_to_end"] = math.inf
                notes.append(f"{key}: time limit reached before the end-to-end check of {r['spec']}")
                continue
            steps.show(key, f"end to end: {r['spec']}")
            r["end_to_end"] = worst_error(outputs(module({key: r["spec"]}), batches), want_calib)
        steps.skip(per_layer + 1 - sum(not r["exact"] for r in f))
        frontier[key] = [r for r in f if r["end_to_end"] <= margin * budget]
    choice = _allocate(frontier, margin * budget)  # 3. the budget shared out (errors taken to add in quadrature) ...

    def current() -> dict[str, str]:
        return {k: frontier[k][i]["spec"] for k, i in choice.items() if frontier[k]}

    steps.show("", "held-out check")
    backed: list[str] = []
    while True:  # 4. ... then measured on held-out inputs, backing off while it exceeds the budget
        mod = module(current())
        e2e = worst_error(outputs(mod, checks), want)
        if e2e <= budget:
            break
        k = _back_off(frontier, choice)
        if k is None:
            break
        backed.append(k)
    if backed:
        notes.append(f"backed off after the held-out check: {', '.join(backed)}")
    if e2e > budget:
        notes.append(f"end-to-end error {e2e:.3g} exceeds the budget even with every layer exact (rounding)")
    with torch.no_grad():
        ref_t, ref_spread = timed(lambda: [run_batch(ref, b) for b in checks], repeat)
        plan_t, plan_spread = timed(lambda: [run_batch(mod, b) for b in checks], repeat)
    steps.done()
    chosen = {**exact_specs, **current()}
    measurements = {
        k: {
            "exact": exact_specs[k],
            "chosen": chosen[k],
            "candidates": rows.get(k, []),
            "exact_seconds": _seconds(rows.get(k, []), exact_specs[k]),
            "chosen_seconds": _seconds(rows.get(k, []), chosen[k]),
        }  # fmt: skip
        for k in exact_specs
    }
    return Plan(
        layers=literal_plan(chosen),
        budget=float(budget),
        backend=backend,
        device=device_name(backend),
        versions=versions(),
        sizes=sizes,
        program=program_hash(prog),
        measurements=measurements,
        end_to_end={
            "error": e2e,
            "seconds": plan_t,
            "spread": plan_spread,
            "exact_seconds": ref_t,
            "exact_spread": ref_spread,
            "held_out": held_out is not None,
            "tuning_seconds": time.perf_counter() - start,
        },  # fmt: skip
        notes=notes,
    )


class Steps:
    """Progress over the tuner's steps (candidate measurements, end-to-end checks)."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.n = progress, total, 0

    def show(self, layer: str, what: str) -> None:
        if self.progress is not None:
            self.progress(layer, what, self.n, self.total)
        self.n += 1

    def skip(self, k: int) -> None:
        self.n += max(k, 0)

    def done(self) -> None:
        if self.progress is not None:
            self.progress("", "done", self.total, self.total)


def _frontier(rows: list[dict], cap: float, per_layer: int) -> list[dict]:
    """A layer's choices, fastest first and each more accurate than every faster one: up to ``per_layer``
    approximations faster than its fastest exact candidate with their own error within ``cap``, then that exact
    candidate (empty when no exact candidate ran)."""
    ok = [r for r in rows if math.isfinite(r["seconds"])]
    exact = sorted((r for r in ok if r["exact"]), key=lambda r: r["seconds"])
    if not exact:
        return []
    fast = sorted((r for r in ok if not r["exact"] and r["seconds"] < exact[0]["seconds"] and r["error"] <= cap),
                  key=lambda r: r["seconds"])  # fmt: skip
    pareto: list[dict] = []
    for r in fast:
        if not pareto or r["error"] < pareto[-1]["error"]:
            pareto.append(r)
    if len(pareto) > per_layer:  # spread over the front, the most accurate kept
        step = (len(pareto) - 1) / max(per_layer - 1, 1)
        pareto = [pareto[round(len(pareto) - 1 - i * step)] for i in reversed(range(per_layer))]
    return [*pareto, exact[0]]


def _allocate(frontier: dict[str, list[dict]], budget: float) -> dict[str, int]:
    """Per layer an index into its frontier: from all exact, greedily the move that saves the most time per unit
    of squared end-to-end error added, while the errors' quadrature sum stays within ``budget``."""
    choice = {k: len(f) - 1 for k, f in frontier.items() if f}
    err2 = 0.0
    while True:
        best, best_val = None, 0.0
        for k, i in choice.items():
            cur = frontier[k][i]
            for j in range(i):
                r = frontier[k][j]
                add = r["end_to_end"] ** 2 - cur["end_to_end"] ** 2
                if err2 + add > budget**2:
                    continue
                val = (cur["seconds"] - r["seconds"]) / max(add, 1e-30)
                if val > best_val:
                    best, best_val = (k, j, add), val
        if best is None:
            return choice
        k, j, add = best
        choice[k] = j
        err2 += add


def _back_off(frontier: dict[str, list[dict]], choice: dict[str, int]) -> str | None:
    """Move the layer that gives up the least time per unit of error removed to its next more accurate choice."""
    best, best_cost = None, math.inf
    for k, i in choice.items():
        f = frontier[k]
        if i + 1 >= len(f):
            continue
        gain = f[i]["end_to_end"] ** 2 - f[i + 1]["end_to_end"] ** 2
        cost = (f[i + 1]["seconds"] - f[i]["seconds"]) / max(gain, 1e-30)
        if cost < best_cost:
            best, best_cost = k, cost
    if best is not None:
        choice[best] += 1
    return best


def _seconds(rows: list[dict], spec: str) -> float | None:
    return next((r["seconds"] for r in rows if r["spec"] == spec), None)


def _sizes(prog: Program, batch: Batch) -> dict[str, int]:
    """The symbol sizes ``batch`` binds (what the plan was measured at), flattened as the built module does."""
    import sympy

    from .backends.torch.codegen import _kwarg_order
    from .ir.types import TensorType

    args, kwargs = (
        ((), dict(batch)) if isinstance(batch, dict) else (batch if isinstance(batch, tuple) else (batch,), {})
    )
    order = _kwarg_order(prog.in_spec)
    if order is not None:
        kwargs = {k: kwargs[k] for k in order if k in kwargs}
    flat = pytree.tree_leaves((tuple(args), kwargs))
    sizes: dict[str, int] = {}
    for x, v in zip(flat, prog.inputs, strict=False):
        if isinstance(x, torch.Tensor) and isinstance(v.type, TensorType):
            for n, d in zip(x.shape, v.type.shape, strict=False):
                if isinstance(d, sympy.Symbol):
                    sizes.setdefault(d.name, int(n))
    return sizes
