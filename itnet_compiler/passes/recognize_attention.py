"""Recognise softmax attention as an ``it.transform`` of the ``dot_exp`` family.

Expects: generic ATen nodes (convolutions may already be transforms). Guarantees: valid IR; these become one
``dot_exp`` node each, exactly (no approximation):
- ``aten.scaled_dot_product_attention`` with dropout 0: boolean or additive ``attn_mask``, ``is_causal``, ``scale``,
  ``enable_gqa``;
- the hand-written chain, anchored at its last matmul: ``matmul|bmm(q, kᵀ)`` → optional ``mul|div`` by a constant →
  optional ``add`` of a bias/mask → ``softmax`` (or ``_softmax``) over the last dim → optional ``to`` / eval
  ``dropout`` → ``matmul|bmm(·, v)``; also ``baddbmm(mask, q, kᵀ)`` as nn.MultiheadAttention writes it. 3-d (bmm)
  operands are viewed as one head per batch entry. If the weights are also used elsewhere (``need_weights``,
  ``output_attentions``) the node returns them as a second output.
HF's ``repeat_kv`` (unsqueeze → expand → reshape of k or v) is looked through: the node reads the un-repeated k/v and
records ``kv_heads`` (GQA/MQA); the repeat becomes dead code.
"""

from __future__ import annotations

import math

import sympy
import torch

from ..ir.core import TRANSFORM, Node, Value
from ..ir.families import DotExpAttrs
from ..ir.types import TensorType
from .rewrite import Match, Rewrite, Rule, bind

_MATMUL = ("aten.matmul.default", "aten.bmm.default")
_SOFTMAX = ("aten.softmax.int", "aten._softmax.default", "aten._safe_softmax.default")
_PASSTHROUGH = ("aten.to.dtype", "aten._to_copy.default", "aten.type_as.default")
_DROPOUT = ("aten.dropout.default", "aten.native_dropout.default")


def _tt(v: object) -> TensorType | None:
    return v.type if isinstance(v, Value) and isinstance(v.type, TensorType) else None


def _strip_repeat_kv(m: Match, v: Value) -> Value:
    """``reshape(expand(unsqueeze(x, 2), [B, Hkv, n, L, D]), [B, Hkv*n, L, D])`` -> ``x``."""
    r = m.producer(v)
    if r is None or r.op not in ("aten.reshape.default", "aten.view.default", "aten._unsafe_view.default"):
        return v
    e = m.producer(r.args[0])
    if e is None or e.op != "aten.expand.default" or m.n_uses(e.outputs[0]) != 1:
        return v
    u = m.producer(e.args[0])
    if u is None or u.op != "aten.unsqueeze.default" or u.args[1] != 2:
        return v
    base = u.args[0]
    bt, vt = _tt(base), _tt(v)
    if bt is None or vt is None or bt.rank != 4 or vt.rank != 4:
        return v
    if bt.shape[0] != vt.shape[0] or bt.shape[2:] != vt.shape[2:]:
        return v
    return base


def _static_dim(d: sympy.Expr) -> int | None:
    return int(d) if d.is_Integer else None


def _sdpa(m: Match) -> Rewrite | None:
    node = m.node
    a = bind(node)
    q, k, v = a["query"], a["key"], a["value"]
    qt, kt, vt = _tt(q), _tt(k), _tt(v)
    if qt is None or kt is None or vt is None or not (qt.rank == kt.rank == vt.rank == 4):
        return None
    if a.get("dropout_p", 0.0) not in (0, 0.0):
        return None
    d = _static_dim(qt.shape[-1])
    scale = a.get("scale")
    if scale is None:
        if d is None:
            return None
        scale = 1.0 / math.sqrt(d)
    if not isinstance(scale, (int, float)):
        return None
    k = _strip_repeat_kv(m, k)
    v = _strip_repeat_kv(m, v)
    kt, vt = _tt(k), _tt(v)
    heads, kv_heads = _static_dim(qt.shape[1]), _static_dim(kt.shape[1])
    if heads is None or kv_heads is None or kv_heads != _static_dim(vt.shape[1]) or heads % kv_heads:
        return None
    if kv_heads != heads and not a.get("enable_gqa") and k is a["key"]:
        return None
    mask = a.get("attn_mask")
    mask_kind = "none"
    if mask is not None:
        mt = _tt(mask)
        if mt is None:
            return None
        mask_kind = "bool" if mt.dtype == torch.bool else "additive"
    attrs = DotExpAttrs(
        heads=heads,
        kv_heads=kv_heads,
        scale=float(scale),
        support="causal" if a.get("is_causal") else "full",
        mask=mask_kind,
    )
    inputs: dict[str, object] = {"q": q, "k": k, "v": v}
    if mask is not None:
        inputs["mask"] = mask
    out = node.outputs[0]
    new = Node(TRANSFORM, [], inputs, [Value(out.name, out.type)], attrs, node.layer)
    return Rewrite([new], {id(out): new.outputs[0]})


def _chain(m: Match) -> Rewrite | None:
    """Anchor: the final ``matmul(P, v)``. Walk back through dropout/to to softmax, then to the scores."""
    node = m.node
    p_val, v = node.args[0], node.args[1]
    weights_users = 0
    hops = [p_val]
    cur = m.producer(p_val)
    while cur is not None and (cur.op in _PASSTHROUGH or cur.op in _DROPOUT):
        if cur.op in _PASSTHROUGH and (_tt(cur.outputs[0]) is None or _tt(cur.args[0]).dtype != _tt(cur.outputs[0]).dtype):
            return None
        if cur.op in _DROPOUT and bind(cur).get("train") not in (False, None) and bind(cur).get("p") not in (0, 0.0):
            return None
        hops.append(cur.args[0])
        cur = m.producer(cur.args[0])
    if cur is None or cur.op not in _SOFTMAX:
        return None
    soft = cur
    sa = bind(soft)
    logits = sa.get("self")
    lt = _tt(logits)
    if lt is None or sa.get("dim") not in (-1, lt.rank - 1):
        return None
    # Every hop but the last feeds exactly one reader; extra readers of the final weights are returned.
    for h in hops[1:]:
        if m.n_uses(h) != 1:
            return None
    weights_users = m.n_uses(p_val) - 1
    scale, mask, qk = 1.0, None, m.producer(logits)
    if qk is not None and qk.op == "aten.add.Tensor" and bind(qk).get("alpha", 1) == 1:
        x, y = qk.args[0], qk.args[1]
        px = m.producer(x)
        if px is not None and px.op in _MATMUL + ("aten.mul.Tensor", "aten.div.Tensor"):
            base, mask = x, y
        else:
            base, mask = y, x
        if _tt(mask) is None or m.n_uses(base) != 1:
            return None
        qk = m.producer(base)
    if qk is not None and qk.op in ("aten.mul.Tensor", "aten.div.Tensor"):
        c = qk.args[1]
        if not isinstance(c, (int, float)) or isinstance(c, bool) or m.n_uses(qk.outputs[0]) != 1:
            return None
        scale = float(c) if qk.op == "aten.mul.Tensor" else 1.0 / float(c)
        qk = m.producer(qk.args[0])
    if qk is None:
        return None
    if qk.op == "aten.baddbmm.default" and mask is None:
        ba = bind(qk)
        if ba.get("beta", 1) != 1 or ba.get("alpha", 1) != 1:
            return None
        mask, q, kT = ba["self"], ba["batch1"], ba["batch2"]
    elif qk.op in _MATMUL:
        q, kT = qk.args[0], qk.args[1]
    else:
        return None
    if m.n_uses(qk.outputs[0]) != 1:
        return None
    return _build(m, q, kT, v, mask, scale, weights_users > 0, p_val)


def _build(m: Match, q: Value, kT: Value, v: Value, mask: Value | None, scale: float, weights: bool, p_val: Value):
    node = m.node
    qt, kTt, vt = _tt(q), _tt(kT), _tt(v)
    if qt is None or kTt is None or vt is None or not (qt.rank == kTt.rank == vt.rank) or qt.rank not in (3, 4):
        return None
    layer = node.layer
    pre: list[Node] = []
    tp = m.producer(kT)
    if tp is not None and tp.op == "aten.transpose.int" and {d % kTt.rank for d in tp.args[1:3]} == {kTt.rank - 1, kTt.rank - 2}:
        k = tp.args[0]
    else:
        kt_shape = (*kTt.shape[:-2], kTt.shape[-1], kTt.shape[-2])
        pre.append(_node(m, "aten.transpose.int", [kT, -2, -1], TensorType(kTt.dtype, kt_shape), layer, "k"))
        k = pre[-1].outputs[0]
    three = qt.rank == 3
    if three:
        q, k, v = (_unsq(m, x, pre, layer) for x in (q, k, v))
        if mask is not None and _tt(mask).rank == 3:
            mask = _unsq(m, mask, pre, layer)
    else:
        k = _strip_repeat_kv(m, k)
        v = _strip_repeat_kv(m, v)
    qt, kt, vt = _tt(q), _tt(k), _tt(v)
    heads, kv_heads = _static_dim(qt.shape[1]), _static_dim(kt.shape[1])
    if heads is None or kv_heads is None or kv_heads != _static_dim(vt.shape[1]) or heads % kv_heads:
        return None
    if qt.shape[0] != kt.shape[0] or qt.shape[-1] != kt.shape[-1] or kt.shape[2] != vt.shape[2]:
        return None
    mask_kind = "none"
    if mask is not None:
        mt = _tt(mask)
        if mt is None or mt.dtype == torch.bool:
            return None
        mask_kind = "additive"
    out = node.outputs[0]
    ot = _tt(out)
    res_t = TensorType(ot.dtype, (qt.shape[0], qt.shape[1], qt.shape[2], vt.shape[3])) if three else ot
    outs = [Value(m.fresh(out.name + "_it") if three else out.name, res_t)]
    if weights:
        pt = _tt(p_val)
        w_t = TensorType(pt.dtype, (qt.shape[0], qt.shape[1], qt.shape[2], kt.shape[2])) if three else pt
        outs.append(Value(m.fresh(p_val.name + "_w"), w_t))
    attrs = DotExpAttrs(heads=heads, kv_heads=kv_heads, scale=scale, mask=mask_kind, return_weights=weights)
    inputs: dict[str, object] = {"q": q, "k": k, "v": v}
    if mask is not None:
        inputs["mask"] = mask
    t = Node(TRANSFORM, [], inputs, outs, attrs, layer)
    nodes = [*pre, t]
    replace = {}
    if three:
        sq = _node(m, "aten.squeeze.dim", [outs[0], 1], ot, layer, out.name)
        nodes.append(sq)
        replace[id(out)] = sq.outputs[0]
        if weights:
            sw = _node(m, "aten.squeeze.dim", [outs[1], 1], _tt(p_val), layer, p_val.name + "_sq")
            nodes.append(sw)
            replace[id(p_val)] = sw.outputs[0]
    else:
        replace[id(out)] = outs[0]
        if weights:
            replace[id(p_val)] = outs[1]
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
    (("aten.scaled_dot_product_attention.default",), _sdpa),
    (_MATMUL, _chain),
]
