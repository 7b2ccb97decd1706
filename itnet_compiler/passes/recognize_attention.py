"""Recognise softmax attention as an ``it.transform`` of the ``dot_exp`` family.

Expects: generic ATen nodes (convolutions may already be transforms). Guarantees: valid IR; these become one
``dot_exp`` node each, exactly (no approximation):
- ``aten.scaled_dot_product_attention`` with dropout 0, on [B, H, L, D] or [N, L, D] operands: boolean or additive
  ``attn_mask``, ``is_causal``, ``scale``, ``enable_gqa``; likewise the fused ATen kernels it dispatches to
  (``_scaled_dot_product_flash_attention_for_cpu``, ``_flash_attention``, ``_efficient_attention``, as AOTAutograd
  graphs hold them) when nothing reads their extra results (the logsumexp a backward graph saves keeps them generic);
- the hand-written chain, anchored at its last matmul: ``matmul|bmm(q, kᵀ)`` or ``baddbmm(mask, q, kᵀ)`` (as
  nn.MultiheadAttention writes it), then in any order that keeps the kernel exp(s·⟨q, k⟩ + b): ``mul|div`` by a
  constant, ``add`` of an additive mask or bias, ``masked_fill(·, drop, -inf)`` / ``where(keep, ·, -inf)``; then
  ``softmax`` over the last dim → optional same-dtype ``to`` / eval ``dropout`` → ``matmul|bmm(·, v)``.
  3-d (bmm) operands are viewed as one head per batch entry. If the weights are also read elsewhere
  (``need_weights``, ``output_attentions``) the node returns them as a second output.
HF's ``repeat_kv`` (unsqueeze → expand → reshape) and ``repeat_interleave`` over the head dim are looked through: the
node reads the un-repeated k/v and records ``kv_heads`` (GQA/MQA); the repeat becomes dead code.

A chain that does not fit exactly (a scale applied to a mask, a bias that broadcasts the scores to a larger shape,
a softmax in another precision, two masks) is left generic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy
import torch

from ..ir.core import TRANSFORM, Node, Value
from ..ir.families import DotExpAttrs
from ..ir.types import TensorType
from . import score_chain
from .rewrite import Match, Rewrite, Rule, bind

_MATMUL = ("aten.matmul.default", "aten.bmm.default")
_SOFTMAX = ("aten.softmax.int", "aten._softmax.default", "aten._safe_softmax.default")
_PASSTHROUGH = ("aten.to.dtype", "aten._to_copy.default", "aten.type_as.default")
_DROPOUT = ("aten.dropout.default", "aten.native_dropout.default")
_RESHAPE = ("aten.reshape.default", "aten.view.default", "aten._unsafe_view.default")
_FILL_DROP = ("aten.masked_fill.Scalar", "aten.masked_fill_.Scalar")  # fills where the condition is true
_WHERE = ("aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.where.self")
_SCALE = ("aten.mul.Tensor", "aten.div.Tensor", "aten.mul.Scalar", "aten.div.Scalar")
_SDPA = ("aten.scaled_dot_product_attention.default",)
# Fused kernels: result 0 is the attention output; the others (logsumexp, RNG state, ...) serve only a backward.
_FUSED_SDPA = (
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
)


def _tt(v: object) -> TensorType | None:
    return v.type if isinstance(v, Value) and isinstance(v.type, TensorType) else None


def _static_dim(d: sympy.Expr) -> int | None:
    return int(d) if d.is_Integer else None


def _is_neg_inf(x: object) -> bool:
    return isinstance(x, float) and x == float("-inf")


def _strip_repeat_kv(m: Match, v: Value) -> Value:
    """``reshape(expand(unsqueeze(x, 2), [B, Hkv, n, L, D]), [B, Hkv*n, L, D])`` or
    ``repeat_interleave(x, n, 1)`` -> ``x``: both repeat each kv head n times in place (head h reads kv head h // n)."""
    r = m.producer(v)
    if r is None:
        return v
    if r.op == "aten.repeat_interleave.self_int":
        base = _repeat_interleave_base(r)
    elif r.op in _RESHAPE:
        base = _expand_base(m, r)
    else:
        return v
    bt, vt = _tt(base), _tt(v)
    if bt is None or vt is None or bt.rank != 4 or vt.rank != 4:
        return v
    if bt.shape[0] != vt.shape[0] or bt.shape[2:] != vt.shape[2:]:
        return v
    return base


def _expand_base(m: Match, r: Node) -> Value | None:
    e = m.producer(r.args[0])
    if e is None or e.op != "aten.expand.default" or m.n_uses(e.outputs[0]) != 1:
        return None
    u = m.producer(e.args[0])
    if u is None or u.op != "aten.unsqueeze.default" or u.args[1] not in (2, -3):
        return None
    return u.args[0]


def _repeat_interleave_base(r: Node) -> Value | None:
    a = bind(r)
    if not isinstance(a.get("repeats"), int) or a.get("dim") not in (1, -3):
        return None
    return a["self"]


# ---------------------------------------------------------------------------------------------------------- SDPA
def _sdpa(m: Match) -> Rewrite | None:
    node = m.node
    if node.op in _FUSED_SDPA and (not m.n_uses(node.outputs[0]) or any(m.n_uses(o) for o in node.outputs[1:])):
        return None  # already rewritten (result 0 unread), or a backward reads the logsumexp
    a = bind(node)
    q, k, v = a["query"], a["key"], a["value"]
    qt, kt, vt = _tt(q), _tt(k), _tt(v)
    if qt is None or kt is None or vt is None or not (qt.rank == kt.rank == vt.rank) or qt.rank not in (3, 4):
        return None
    if a.get("dropout_p", 0.0) not in (0, 0.0):
        return None
    scale = a.get("scale")
    if scale is None:
        d = _static_dim(qt.shape[-1])
        if d is None:
            return None
        scale = 1.0 / math.sqrt(d)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        return None
    mask = a.get("attn_mask", a.get("attn_bias"))
    mt = _tt(mask)
    if mask is not None and mt is None:
        return None
    if mt is not None and mt.rank > qt.rank:
        return None  # the mask would broadcast the output to a larger shape
    three = qt.rank == 3
    if three and (kt.shape[0] != qt.shape[0] or vt.shape[0] != qt.shape[0]):
        return None  # 3-d GQA repeats over dim 0, which a view with one head per batch entry cannot express
    pre: list[Node] = []
    if three:
        q, k, v = (_unsq(m, x, pre, node.layer) for x in (q, k, v))
        if mt is not None and mt.rank == 3:
            mask = _unsq(m, mask, pre, node.layer)
    else:
        k, v = _strip_repeat_kv(m, k), _strip_repeat_kv(m, v)
        qt, kt, vt = _tt(q), _tt(k), _tt(v)
        heads, kv_heads = _static_dim(qt.shape[1]), _static_dim(kt.shape[1])
        v_heads = _static_dim(vt.shape[1])
        broadcast = kv_heads == 1 and v_heads == 1  # SDPA broadcasts a key/value head dim of 1: multi-query
        if heads != kv_heads and not a.get("enable_gqa") and k is a["key"] and v is a["value"] and not broadcast:
            return None  # SDPA without enable_gqa broadcasts nothing else: the shapes would not have run
    spec = _Spec(scale=float(scale), mask=mask, causal=bool(a.get("is_causal")))
    return _emit(m, q, k, v, spec, pre, weights=None, three=three)


# --------------------------------------------------------------------------------------------- hand-written chain
@dataclass
class _Spec:
    scale: float = 1.0
    mask: Value | None = None
    # ``drop`` masks hold True where the score is dropped (masked_fill); they are negated before use.
    drop: bool = False
    causal: bool = False
    mod: str = ""  # the score expression (ir/score_mod.py) over the extras
    extras: list[Value] = field(default_factory=list)
    sinks: Value | None = None  # per-head sink logits [H]


def _chain(m: Match) -> Rewrite | None:
    """Anchor: the final ``matmul(P, v)``. Walk back through dropout/to to softmax, then to the scores."""
    node = m.node
    p_val, v = node.args[0], node.args[1]
    hops = [p_val]
    cur = m.producer(p_val)
    viewed = False  # the weights pass through views of their leading dims (3-d <-> 4-d <-> 5-d layouts)
    zeroed = None  # masked_fill(P, c, 0) after the softmax: rows c rules out entirely become 0 (SEW-D, DeBERTa v1)
    sliced = None  # P[..., :L_k] after a softmax over [scores, sink column] (attention sinks, gpt-oss)
    while cur is not None and (cur.op in _PASSTHROUGH or cur.op in _DROPOUT or cur.op in _RESHAPE or _zeroes(cur)
                               or (sliced is None and _drops_last_column(cur))):  # fmt: skip
        if cur.op in _RESHAPE and not score_chain._leading_view(cur):
            return None
        if cur.op == "aten.slice.Tensor":
            sliced = cur
        elif _zeroes(cur):
            if zeroed is not None:
                return None
            zeroed = cur.args[1]
        elif cur.op not in _RESHAPE and not _is_identity(cur):
            return None
        viewed = viewed or cur.op in _RESHAPE
        hops.append(cur.args[0])
        cur = m.producer(cur.args[0])
    if cur is None or cur.op not in _SOFTMAX or not _plain_softmax(cur):
        return None
    # Every hop but the last feeds exactly one reader; extra readers of the final weights are returned.
    if any(m.n_uses(h) != 1 for h in hops[1:]):
        return None
    if sliced is not None:
        split = _sink_split(m, cur.args[0], _tt(sliced.outputs[0]).shape[-1])
        if split is None or m.n_uses(p_val) > 1:
            return None
        return _modified(m, split[0], v, zeroed, sinks=split[1:])
    scores = None if viewed or zeroed is not None else _scores(m, cur.args[0])
    if scores is not None:
        q, kT, spec = scores
        weights = p_val if m.n_uses(p_val) > 1 else None
        if weights is not None and not _read_after(m, weights):
            return None
        built = _build(m, q, kT, v, spec, weights)
        if built is not None or weights is not None:
            return built
    return None if m.n_uses(p_val) > 1 else _modified(m, cur.args[0], v, zeroed)


def _zeroes(n: Node) -> bool:
    """``masked_fill(P, c, 0)`` on same-shape weights with a boolean c."""
    if n.op not in _FILL_DROP or n.args[2] not in (0, 0.0) or _tt(n.args[1]) is None:
        return False
    return _tt(n.args[1]).dtype == torch.bool and _same_shape(n.args[0], n.outputs[0])


def _drops_last_column(n: Node) -> bool:
    """``slice(P, -1, 0, L - 1)`` of weights over L columns: the sink column dropped after the softmax."""
    if n.op != "aten.slice.Tensor" or len(n.args) < 4:
        return False
    src, out = _tt(n.args[0]), _tt(n.outputs[0])
    dim = n.args[1] % src.rank if src is not None and isinstance(n.args[1], int) else None
    if dim != src.rank - 1 or n.args[2] != 0 or (len(n.args) > 4 and n.args[4] != 1):
        return False
    return src.shape[:-1] == out.shape[:-1] and sympy.simplify(src.shape[-1] - out.shape[-1] - 1) == 0


def _sink_split(m: Match, logits: Value, lk: sympy.Expr) -> tuple[Value, Value, list[Node]] | None:
    """``cat([scores, sinks viewed as [1, H, 1, 1] and expanded], -1)``, optionally shifted by its row max: the
    scores, the per-head sink logits and the nodes of their [H] view (none when they are one already)."""
    x = logits
    n = m.producer(x)
    if n is not None and n.op in ("aten.sub.Tensor",) and score_chain._minus_row_max(m, n):
        x = n.args[0]
        n = m.producer(x)
    if n is None or n.op != "aten.cat.default" or len(n.args[0]) != 2:
        return None
    rank = _tt(x).rank
    if (n.args[1] if len(n.args) > 1 else 0) % rank != rank - 1:
        return None
    scores, col = n.args[0]
    st, ct = _tt(scores), _tt(col)
    if st is None or ct is None or st.shape[-1] != lk or ct.shape[-1] != 1 or st.shape[:-1] != ct.shape[:-1]:
        return None
    heads = ct.shape[-3] if ct.rank >= 3 else sympy.Integer(1)
    base = col
    while (p := m.producer(base)) is not None and p.op in ("aten.expand.default", *_RESHAPE, *_PASSTHROUGH):
        base = p.args[0]
    bt = _tt(base)
    if bt is None or not heads.is_Integer or sympy.simplify(sympy.Mul(*bt.shape) - heads) != 0 or bt.dtype != st.dtype:
        return None
    if bt.rank >= 3 and bt.shape[-3] != heads:
        return None  # the H entries must lie along the head dim
    if bt.shape == (heads,):
        return scores, base, []
    flat = Value(m.fresh(base.name + "_h"), TensorType(bt.dtype, (heads,)))
    return scores, flat, [Node("aten.reshape.default", [base, [int(heads)]], {}, [flat], None, m.node.layer)]


def _modified(
    m: Match, logits: Value, v: Value, zeroed: Value | None = None, sinks: tuple[Value, list[Node]] | None = None
) -> Rewrite | None:
    """The chain as scale, score expression, extras and one outermost mask (``score_chain``), in any layout whose
    leading dims regroup [B, H]. ``zeroed``: the condition of a ``masked_fill(P, c, 0)`` after the softmax, which with
    a ``finfo.min`` fill of the same c before it is exactly a boolean mask (a row c rules out entirely is 0)."""
    got = score_chain.walk(m, logits)
    form = score_chain.normal_form(*got) if got is not None else None
    if form is not None and zeroed is not None:
        form = score_chain.as_drop_mask(form, zeroed)
    text = score_chain.expression_text(form.expr) if form is not None else None
    if text is None:
        return None
    _, sc = got
    lead = _tt(logits).shape[:-2]
    heads = sympy.Integer(1) if len(lead) == 1 else lead[-1]
    raw_t, qt, kTt, vt = _tt(sc.raw), _tt(sc.q), _tt(sc.kT), _tt(v)
    if not heads.is_Integer or None in (qt, kTt, vt) or qt.rank != kTt.rank or qt.rank < 3:
        return None
    if qt.shape[:-2] != raw_t.shape[:-2] or kTt.shape[:-2] != raw_t.shape[:-2]:
        return None  # the product broadcasts over its batch dims
    if vt.rank < 3 or vt.shape[:-2] != _tt(m.node.outputs[0]).shape[:-2]:
        return None
    lay = score_chain.Layout(m, int(heads), sympy.Mul(*lead) / heads, m.node.layer)
    k = _untranspose(m, sc.kT, lay)
    q4, k4, v4 = lay.operand(sc.q), lay.operand(k), lay.operand(v)
    if None in (q4, k4, v4):
        return None
    k4 = _strip_repeat_kv(m, k4) if k4 is k else k4
    v4 = _strip_repeat_kv(m, v4) if v4 is v else v4
    extras = [lay.broadcast(x, where) for x, where in form.extras]
    mask = lay.broadcast(*form.mask) if form.mask is not None else None
    if None in extras or (form.mask is not None and mask is None):
        return None
    sink, sink_nodes = sinks if sinks is not None else (None, [])
    if sink is not None and int(heads) != int(_tt(sink).shape[0]):
        return None
    spec = _Spec(scale=form.scale, mask=mask, drop=form.drop, mod=text, extras=extras, sinks=sink)
    pre = [*sink_nodes, *lay.pre]
    return _emit(m, q4, k4, v4, spec, pre, None, three=False, layout=lay)


def _untranspose(m: Match, kT: Value, lay: score_chain.Layout) -> Value:
    """k from ``kT``: the transpose's input when it is one over the last two dims, else a new transpose."""
    t = _tt(kT)
    tp = m.producer(kT)
    if (
        tp is not None
        and tp.op == "aten.transpose.int"
        and {d % t.rank for d in tp.args[1:3]} == {t.rank - 1, t.rank - 2}
    ):
        return tp.args[0]
    return lay._op("aten.transpose.int", [kT, -2, -1], (*t.shape[:-2], t.shape[-1], t.shape[-2]), t.dtype, "k")


def _read_after(m: Match, v: Value) -> bool:
    """Every reader of ``v`` comes after the anchor, so it may read the transform's second output instead."""
    order = {n: i for i, n in enumerate(m.prog.nodes)}
    anchor = order[m.node]
    return all(order[n] > anchor for n in m.users.get(v, []) if n is not m.node)


def _is_identity(n: Node) -> bool:
    """A same-dtype ``to`` or a dropout that drops nothing (eval, or p = 0)."""
    if n.op in _PASSTHROUGH:
        src, out = _tt(n.args[0]), _tt(n.outputs[0])
        return src is not None and out is not None and src.dtype == out.dtype
    a = bind(n)
    return a.get("train") is False or a.get("p") in (0, 0.0)


def _plain_softmax(n: Node) -> bool:
    """Softmax over the last dim, computed and returned in the dtype of its input."""
    a = bind(n)
    src, out = _tt(a.get("self")), _tt(n.outputs[0])
    if src is None or out is None or src.dtype != out.dtype or src.shape != out.shape:
        return False
    if a.get("dim") not in (-1, src.rank - 1):
        return False
    return not a.get("half_to_float")


def _scores(m: Match, logits: Value) -> tuple[Value, Value, _Spec] | None:
    """Peel scale, bias and fill ops off the softmax input, outermost first, down to ``q @ kᵀ``.

    The kernel is exp(scale·⟨q, k⟩ + bias) with masked entries at -inf, so a bias must not sit under a scale
    (it would be scaled too), and a -inf fill may sit anywhere as long as every scale is positive.
    """
    spec = _Spec()
    scaled = False
    cur = logits
    while True:
        n = m.producer(cur)
        if n is None or _tt(n.outputs[0]) is None or (cur is not logits and m.n_uses(cur) != 1):
            return None
        if n.op in _MATMUL:
            return n.args[0], n.args[1], spec
        if n.op == "aten.baddbmm.default":
            a = bind(n)
            # baddbmm adds its bias before any scale peeled above it: that scale would scale the bias too.
            if spec.mask is not None or scaled or a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
                return None
            if not _broadcasts_into(a["self"], n.outputs[0]):
                return None
            spec.mask = a["self"]
            return a["batch1"], a["batch2"], spec
        step = _peel(m, n, spec, scaled)
        if step is None:
            return None
        cur, scaled = step, scaled or n.op in _SCALE


def _peel(m: Match, n: Node, spec: _Spec, scaled: bool) -> Value | None:
    """One step of ``_scores``: record what ``n`` contributes to ``spec`` and return the scores it reads."""
    out = n.outputs[0]
    if n.op in _SCALE:
        c = n.args[1]
        # A positive finite constant keeps -inf fills at -inf; anything else stays generic.
        if not isinstance(c, (int, float)) or isinstance(c, bool) or c <= 0 or not math.isfinite(c):
            return None
        spec.scale *= float(c) if n.op.startswith("aten.mul") else 1.0 / float(c)
        return n.args[0] if _tt(n.args[0]) is not None else None
    if n.op == "aten.add.Tensor":
        if spec.mask is not None or scaled or bind(n).get("alpha", 1) != 1:
            return None
        base, bias = n.args[0], n.args[1]
        if (_score_like(m, bias) and not _score_like(m, base)) or not _same_shape(base, out):
            base, bias = bias, base
        if _tt(bias) is None or _tt(bias).dtype == torch.bool or not _same_shape(base, out):
            return None
        if not _broadcasts_into(bias, out):
            return None
        spec.mask = bias
        return base
    if n.op in _FILL_DROP or n.op in _WHERE:
        return _peel_fill(n, spec)
    return None


def _peel_fill(n: Node, spec: _Spec) -> Value | None:
    """``masked_fill(s, drop, -inf)`` / ``where(keep, s, -inf)`` / ``where(drop, -inf, s)``: a boolean mask."""
    if spec.mask is not None:
        return None
    out = n.outputs[0]
    if n.op in _FILL_DROP:
        base, cond, value, drop = n.args[0], n.args[1], n.args[2], True
    elif n.op == "aten.where.ScalarOther":
        cond, base, value, drop = n.args[0], n.args[1], n.args[2], False
    elif n.op == "aten.where.ScalarSelf":
        cond, value, base, drop = n.args[0], n.args[1], n.args[2], True
    else:
        return None  # where.self: the fill is a tensor, not a constant -inf
    ct = _tt(cond)
    if not _is_neg_inf(value) or ct is None or ct.dtype != torch.bool or not _same_shape(base, out):
        return None
    if not _broadcasts_into(cond, out):
        return None
    spec.mask, spec.drop = cond, drop
    return base


def _score_like(m: Match, v: object) -> bool:
    """Produced by an op the scores pass through (so the other operand of an ``add`` is the bias)."""
    p = m.producer(v)
    return p is not None and (p.op in _MATMUL + _SCALE + _FILL_DROP + _WHERE or p.op == "aten.baddbmm.default")


def _same_shape(a: object, b: Value) -> bool:
    at, bt = _tt(a), _tt(b)
    return at is not None and bt is not None and at.shape == bt.shape and at.dtype == bt.dtype


def _broadcasts_into(mask: object, scores: Value) -> bool:
    """The mask broadcasts to the scores' shape without enlarging it."""
    mt, st = _tt(mask), _tt(scores)
    if mt is None or st is None or mt.rank > st.rank:
        return False
    return all(d == 1 or d == s for d, s in zip(reversed(mt.shape), reversed(st.shape), strict=False))


def _build(m: Match, q: Value, kT: Value, v: Value, spec: _Spec, weights: Value | None) -> Rewrite | None:
    node = m.node
    qt, kTt, vt = _tt(q), _tt(kT), _tt(v)
    if qt is None or kTt is None or vt is None or not (qt.rank == kTt.rank == vt.rank) or qt.rank not in (3, 4):
        return None
    layer = node.layer
    pre: list[Node] = []
    tp = m.producer(kT)
    last_two = {kTt.rank - 1, kTt.rank - 2}
    if tp is not None and tp.op == "aten.transpose.int" and {d % kTt.rank for d in tp.args[1:3]} == last_two:
        k = tp.args[0]
    else:
        kt_shape = (*kTt.shape[:-2], kTt.shape[-1], kTt.shape[-2])
        pre.append(_node(m, "aten.transpose.int", [kT, -2, -1], TensorType(kTt.dtype, kt_shape), layer, "k"))
        k = pre[-1].outputs[0]
    kt = _tt(k)
    if qt.shape[0] != kt.shape[0] or vt.shape[0] != qt.shape[0]:
        return None  # the matmuls broadcast over the batch: not one attention per batch entry
    three = qt.rank == 3
    if three:
        q, k, v = (_unsq(m, x, pre, layer) for x in (q, k, v))
        if spec.mask is not None and _tt(spec.mask).rank == 3:
            spec.mask = _unsq(m, spec.mask, pre, layer)
    else:
        k, v = _strip_repeat_kv(m, k), _strip_repeat_kv(m, v)
    return _emit(m, q, k, v, spec, pre, weights, three)


def _emit(
    m: Match,
    q: Value,
    k: Value,
    v: Value,
    spec: _Spec,
    pre: list[Node],
    weights: Value | None,
    three: bool,
    layout: score_chain.Layout | None = None,
) -> Rewrite | None:
    """Check the [B, H, L, D] operands and write the transform (and the views back to 3-d when ``three``)."""
    node = m.node
    layer = node.layer
    qt, kt, vt = _tt(q), _tt(k), _tt(v)
    heads, kv_heads = _static_dim(qt.shape[1]), _static_dim(kt.shape[1])
    if heads is None or kv_heads is None or kv_heads != _static_dim(vt.shape[1]) or heads % kv_heads:
        return None
    if qt.shape[0] != kt.shape[0] or qt.shape[-1] != kt.shape[-1] or kt.shape[2] != vt.shape[2]:
        return None
    if len({qt.dtype, kt.dtype, vt.dtype}) != 1:
        return None
    mask, mask_kind = spec.mask, "none"
    if mask is not None:
        mt = _tt(mask)
        if mt is None:
            return None
        mask_kind = "bool" if mt.dtype == torch.bool else "additive"
        if spec.drop:
            keep = _node(m, "aten.logical_not.default", [mask], mt, layer, mask.name + "_keep")
            pre.append(keep)
            mask = keep.outputs[0]
    out = node.outputs[0]
    ot = _tt(out)
    own_t = TensorType(ot.dtype, (qt.shape[0], qt.shape[1], qt.shape[2], vt.shape[3]))
    res_t = own_t if three or layout is not None else ot
    # A fused SDPA node stays until dce (its other results): the transform's result needs a name of its own.
    fresh = three or len(node.outputs) > 1 or layout is not None
    outs = [Value(m.fresh(out.name + "_it") if fresh else out.name, res_t)]
    if weights is not None:
        pt = _tt(weights)
        w_t = TensorType(pt.dtype, (qt.shape[0], qt.shape[1], qt.shape[2], kt.shape[2])) if three else pt
        outs.append(Value(m.fresh(weights.name + "_w"), w_t))
    attrs = DotExpAttrs(
        heads=heads,
        kv_heads=kv_heads,
        scale=spec.scale,
        mask=mask_kind,
        support="causal" if spec.causal else "full",
        return_weights=weights is not None,
        score_mod=spec.mod,
        has_sinks=spec.sinks is not None,
    )
    inputs: dict[str, object] = {"q": q, "k": k, "v": v}
    if mask is not None:
        inputs["mask"] = mask
    if spec.extras:
        inputs["extras"] = list(spec.extras)
    if spec.sinks is not None:
        inputs["sinks"] = spec.sinks
    t = Node(TRANSFORM, [], inputs, outs, attrs, layer)
    nodes = [*pre, t]
    if layout is not None:
        post, back = layout.back(outs[0], ot, out.name + "_v")
        return Rewrite([*nodes, *post], {out: back}) if back is not None else None
    if not three:
        replace = {out: outs[0]}
        if weights is not None:
            replace[weights] = outs[1]
        return Rewrite(nodes, replace)
    sq = _node(m, "aten.squeeze.dim", [outs[0], 1], ot, layer, out.name)
    nodes.append(sq)
    replace = {out: sq.outputs[0]}
    if weights is not None:
        sw = _node(m, "aten.squeeze.dim", [outs[1], 1], _tt(weights), layer, weights.name + "_sq")
        nodes.append(sw)
        replace[weights] = sw.outputs[0]
    return Rewrite(nodes, replace)


def _node(m: Match, op: str, args: list[object], t: TensorType, layer: str, hint: str) -> Node:
    return Node(op, args, {}, [Value(m.fresh(hint), t)], None, layer)


def _unsq(m: Match, x: Value, pre: list[Node], layer: str) -> Value:
    xt = _tt(x)
    t = TensorType(xt.dtype, (xt.shape[0], sympy.Integer(1), *xt.shape[1:]))
    n = _node(m, "aten.unsqueeze.default", [x, 1], t, layer, x.name + "_h")
    pre.append(n)
    return n.outputs[0]


RULES: list[Rule] = [
    (_SDPA + _FUSED_SDPA, _sdpa),
    (_MATMUL, _chain),
]
