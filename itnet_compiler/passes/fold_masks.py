"""Constant attention masks become supports. Valid IR in, valid IR out.

Expects recognised ``dot_exp`` transforms. A mask computed from constants alone (aranges, comparisons, the position
logic of transformers' mask builders) at static sizes is evaluated once, here. When what it admits, together with
the layer's own support, is exactly everything, the causal triangle, or a causal sliding window of r columns, and
the same for every batch entry and head, the mask input is dropped and the support says so (``full``, ``causal`` or
``window(r)``). Kernels then skip what the support rules out without reading a mask, and the cost model counts the
real work. Everything else is left as it is: masks that read program inputs, parameters or buffers (padding masks;
a buffer can be replaced by ``load_state_dict``), masks that anything writes into in place (through a view or
directly), ops with random or uninitialised results, other patterns, and masks too large to evaluate. A mask over
symbolic lengths that reads sizes only (a dynamic-length decoder's causal mask) is evaluated at three lengths in the
symbols' ranges and folded when all three give the same support.
"""

from __future__ import annotations

import torch

from ..ir import score_mod
from ..ir.core import Node, Program, Value, tensor_type
from ..ir.families import DotExpAttrs
from ..ir.ops import resolve_op, returns_list
from ..ir.types import TensorType, free_symbols, numel

# Ops whose result is not a function of their inputs.
_NONDETERMINISTIC = ("rand", "dropout", "bernoulli", "normal", "uniform", "empty", "multinomial", "exponential",
                     "cauchy", "geometric", "poisson", "rrelu")  # fmt: skip
_MAX_PAIRS = 1 << 26  # larger constant masks stay masks: evaluating them costs more than it saves at compile time
_LONGEST = 1024  # the longest length a symbolic mask is evaluated at (its pairs per batch entry: 1M)
_DROPPED = -1e30  # additive entries at or below this admit nothing (HF writes finfo.min, SDPA users -inf)


def fold_masks(prog: Program) -> Program:
    producers = prog.producers()
    weights = {w.value: w for w in prog.weights}
    # one evaluation per mask (a symbolic one per mask and layer kind), however many layers share it
    values: dict[object, torch.Tensor | str | None] = {}
    for node in prog.transforms:
        attrs = node.attrs
        if isinstance(attrs, DotExpAttrs) and attrs.score_mod:
            _fold_fill(prog, node, producers, weights, values)
            attrs = node.attrs
        mask = node.kwargs.get("mask")
        if not isinstance(attrs, DotExpAttrs) or not isinstance(mask, Value):
            continue
        support = _mask_support(prog, node, attrs, mask, producers, weights, values)
        if support is None:
            continue
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "mask"}
        node.attrs = attrs.replace(mask="none", support=support)
    return prog


def _mask_support(prog, node, attrs, mask, producers, weights, values, drop: bool = False) -> str | None:
    """The support a constant boolean (or 0 / -inf) ``mask`` amounts to with the node's own, or None; ``drop``:
    the mask holds True where a pair is removed."""
    if not free_symbols(tensor_type(mask)) and not _symbolic_lengths(node):
        if mask not in values:
            values[mask] = _evaluate(prog, mask, producers, weights)
        value = values[mask]
        if value is not None and drop:
            value = ~value if value.dtype == torch.bool else None
        return _support(node, attrs, value) if value is not None else None
    # one symbolic evaluation (four lengths, up to _LONGEST²) per mask and layer kind, however many layers share it
    key = (mask, drop, attrs.support, *(tensor_type(node.kwargs[r]).shape[2] for r in ("q", "k")))
    if key not in values:
        values[key] = _symbolic_support(prog, node, attrs, mask, producers, weights, drop)
    return values[key]


def _fold_fill(prog, node, producers, weights, values) -> None:
    """A score expression ``where(tK, c, rest)`` (or ``where(tK, rest, c)``) whose fill c is at most -1e30
    (``finfo.min``) and whose condition is constant: when it removes exactly the pairs outside a causal or window
    support, that support replaces it. Such supports leave no row empty, where a finite fill and -inf would differ
    (a fully filled row is eager's uniform average), so the fold is exact."""
    attrs = node.attrs
    e = score_mod.parse(attrs.score_mod)
    if e.op != "where":
        return
    fills = [k for k in (1, 2) if e.args[k].op == "num" and e.args[k].value <= -1e30]
    if len(fills) != 1:
        return
    k = int(e.args[0].name[1:])
    rest = e.args[3 - fills[0]]
    extras = list(node.kwargs.get("extras") or [])
    if k in score_mod.extras(rest):
        return
    support = _mask_support(prog, node, attrs, extras[k], producers, weights, values, drop=fills[0] == 1)
    if support not in ("causal",) and not (support or "").startswith("window"):
        return  # full: no fill at all (left as it is); None: not a support
    keep = [i for i in range(len(extras)) if i != k]
    rest = score_mod.rename(rest, {f"t{old}": f"t{new}" for new, old in enumerate(keep)})
    kwargs = {r: v for r, v in node.kwargs.items() if r != "extras"}
    if keep:
        kwargs["extras"] = [extras[i] for i in keep]
    node.kwargs = kwargs
    node.attrs = attrs.replace(score_mod="" if rest == score_mod.S else score_mod.text(rest), support=support)


def _static(v: Value) -> bool:
    return isinstance(v.type, TensorType) and not free_symbols(v.type)


def _symbolic_lengths(node: Node) -> bool:
    return any(not d.is_Integer for r in ("q", "k") for d in tensor_type(node.kwargs[r]).shape[2:3])


def _symbolic_support(prog, node, attrs, mask, producers, weights, drop: bool = False) -> str | None:
    """A mask over symbolic lengths built from sizes alone (``sym_size`` of inputs, aranges, comparisons: a
    decoder's causal or sliding-window mask): evaluated at several lengths in the symbols' ranges, up to the range's
    end or ``_LONGEST``. Folded when every length gives the same support, or a window(r) where the lengths up to r
    look causal. When the range goes past the longest length evaluated, a window wider than it would look causal
    there: then the mask is folded only if its computation holds no constant at least that large (a window's width
    appears as one)."""
    syms = sorted({s for r in ("q", "k", "mask") for s in free_symbols(tensor_type(node.kwargs[r]))}, key=str)
    found: list[tuple[int, str]] = []
    unseen = False  # some symbol's range goes past every length evaluated
    lengths = {s for r in ("q", "k") for s in tensor_type(node.kwargs[r]).shape[2].free_symbols}
    for trial in (3, 7, 12, _LONGEST):
        sizes = {}
        for sym in syms:
            lo, hi = prog.symbols.get(sym.name, [2, None])
            at = trial if sym in lengths or trial != _LONGEST else 3  # batch-like sizes stay small
            sizes[sym] = max(int(lo or 2), min(at, int(hi) if hi is not None else at))
            unseen = unseen or trial == _LONGEST and sym in lengths and (hi is None or int(hi) > _LONGEST)
        value = _evaluate(prog, mask, producers, weights, sizes)
        if value is not None and drop:
            value = ~value if value.dtype == torch.bool else None
        support = _support(node, attrs, value, sizes) if value is not None else None
        if support is None:
            return None
        found.append((max(sizes.values(), default=trial), support))
    windows = {sup for _, sup in found if sup.startswith("window")}
    if len(windows) > 1:
        return None
    if windows:
        (window,) = windows
        r = int(window[len("window(") : -1])
        return window if all(sup == window or (sup == "causal" and n <= r) for n, sup in found) else None
    if len({sup for _, sup in found}) != 1:
        return None
    if unseen and _largest_literal(mask, producers) >= _LONGEST:
        return None
    return found[0][1]


def _largest_literal(target: Value, producers: dict[Value, Node]) -> float:
    """The largest number written as a literal argument anywhere in ``target``'s computation."""
    best, seen, stack = 0.0, set(), [target]
    while stack:
        v = stack.pop()
        node = producers.get(v)
        if v in seen or node is None:
            continue
        seen.add(v)
        flat = [x for a in (*node.args, *node.kwargs.values()) for x in (a if isinstance(a, (list, tuple)) else [a])]
        nums = [abs(float(x)) for x in flat if isinstance(x, (int, float)) and not isinstance(x, bool)]
        best = max([best, *(x for x in nums if x < 2**62)])  # fills (-inf, finfo.min) and slice ends are not widths
        stack.extend(node.input_values())
    return best


def _evaluate(
    prog: Program, target: Value, producers: dict[Value, Node], weights: dict, sizes: dict | None = None
) -> torch.Tensor | None:
    """The value of ``target`` if it depends on constants only (and, with ``sizes``, on the sizes of inputs: each
    ``sym_size`` reads its symbol's trial size), at those sizes; else None."""
    needed: list[Node] = []
    seen: set[Value] = set()
    stack = [target]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in weights:
            if weights[v].kind != "const" or weights[v].key not in prog.tensors:
                return None  # parameters and buffers belong to the state dict: they may be loaded anew
            continue
        node = producers.get(v)
        if sizes is not None and node is not None and node.op == "aten.sym_size.int":
            needed.append(node)
            continue  # a size: its trial value, never the input's data
        if node is None or node.is_transform or (sizes is None and not _static(v)):
            return None  # a program input, a transform's result, or a symbolic size
        if any(tag in node.op for tag in _NONDETERMINISTIC):
            return None
        needed.append(node)
        stack.extend(node.input_values())
    total = numel(tensor_type(target)).subs(sizes or {})
    if not total.is_Integer or int(total) > _MAX_PAIRS or _written(prog, seen):
        return None
    order = {n: i for i, n in enumerate(prog.nodes)}
    # CPU copies: evaluation never touches the program's own tensors, wherever they live
    env: dict[Value, object] = {w.value: prog.tensors[w.key].to("cpu", copy=True)
                              for w in prog.weights if w.value in seen}  # fmt: skip

    def arg(a: object) -> object:
        if isinstance(a, Value):
            return env[a]
        if isinstance(a, list):
            return [arg(x) for x in a]
        if isinstance(a, torch.device):
            return torch.device("cpu")
        return a

    try:
        for node in sorted(set(needed), key=lambda n: order[n]):
            if node.op == "aten.sym_size.int":
                expr = node.outputs[0].type.expr
                if expr is None or not expr.subs(sizes).is_Integer:
                    return None
                env[node.outputs[0]] = int(expr.subs(sizes))
                continue
            out = resolve_op(node.op)(*[arg(a) for a in node.args], **{k: arg(a) for k, a in node.kwargs.items()})
            outs = list(out) if returns_list(node.op) or len(node.outputs) > 1 else [out]  # type: ignore[arg-type]
            for v, o in zip(node.outputs, outs, strict=True):
                env[v] = o
    except (RuntimeError, ValueError, TypeError):
        return None  # an op that does not run eagerly on constants: leave the mask alone
    result = env[target]
    return result if isinstance(result, torch.Tensor) else None


def _schema(op: str) -> torch.FunctionSchema | None:
    try:
        fn = resolve_op(op)
    except ValueError:
        return None
    return getattr(fn, "_schema", None)


def _written(prog: Program, values: set[Value]) -> bool:
    """Whether any node writes in place into one of ``values`` or into a view of one (``m[:, 3:] = x`` exports as a
    slice and a ``fill_`` / ``copy_`` of it, which the mask value's producers never show)."""
    aliases = set(values)
    for node in prog.nodes:
        schema = _schema(node.op)
        if schema is None:
            continue
        args = list(node.args) + [node.kwargs.get(a.name) for a in schema.arguments[len(node.args) :]]
        for a, arg in zip(schema.arguments, args, strict=False):
            info = a.alias_info
            if info is not None and info.is_write and isinstance(arg, Value) and arg in aliases:
                return True
        if any(r.alias_info is not None for r in schema.returns) and any(v in aliases for v in node.input_values()):
            aliases.update(node.outputs)  # a view shares its base's memory
    return False


def _dropped(mask: torch.Tensor) -> torch.Tensor:
    """Additive entries that admit nothing: -inf, anything at or below -1e30, or the dtype's lowest value (HF's float16
    masks hold -65504, which no logit of a real model offsets: its exp is 0 in every precision)."""
    return (mask <= _DROPPED) | (mask == torch.finfo(mask.dtype).min)


def _support(node: Node, attrs: DotExpAttrs, mask: torch.Tensor, at: dict | None = None) -> str | None:
    """The support equal to (mask and the layer's support), if it is full, causal or a window; else None."""
    sizes = tuple(tensor_type(node.kwargs[r]).shape[2].subs(at or {}) for r in ("q", "k"))
    if not all(d.is_Integer for d in sizes):
        return None  # a constant mask broadcast over a symbolic length
    lq, lk = (int(d) for d in sizes)
    mask = mask.cpu()
    if mask.dtype == torch.bool:
        keep = mask
    elif mask.is_floating_point() and bool(((mask == 0) | _dropped(mask)).all()):
        keep = mask == 0
    else:
        return None
    keep = keep.expand(*keep.shape[:-2], lq, lk).reshape(-1, lq, lk)
    if not bool((keep == keep[:1]).all()):
        return None  # differs between batch entries or heads
    keep = keep[0]
    rows = torch.arange(lq)[:, None]
    cols = torch.arange(lk)[None, :]
    causal = cols <= rows
    if attrs.causal:
        keep = keep & causal & ((rows - cols < attrs.window) if attrs.window else True)
    if bool(keep.all()):
        return "full"
    if torch.equal(keep, causal):
        return "causal"
    if not bool(keep.any(-1).all()):
        return None
    r = int((rows - cols + 1).expand(lq, lk)[keep].max())
    return f"window({r})" if torch.equal(keep, causal & (rows - cols < r)) else None
