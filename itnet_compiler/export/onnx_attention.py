"""The ONNX body of an exact ``dot_exp`` transform: ``Attention`` at opset 23 and later, MatMul / Softmax / MatMul below
(and whenever the weights are returned). Inputs q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], an optional
bool (True = attend) or additive mask; causal supports are top-left aligned, ``window(r)`` keeps i - r < j <= i."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from ..ir import score_mod
from ..ir.core import Node
from .onnx_nodes import Nodes, onnx_dtype


def support_keep(b: Nodes, q: str, k: str, causal: bool, window: int) -> str | None:
    """Bool [Lq, Lk]: True where the support admits (i, j)."""
    if not causal:
        return None
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    lq = b.op("Squeeze", [b.dim(q, 2)])
    lk = b.op("Squeeze", [b.dim(k, 2)])
    i = b.op("Unsqueeze", [b.op("Range", [zero, lq, one]), b.ints(1)])
    j = b.op("Unsqueeze", [b.op("Range", [zero, lk, one]), b.ints(0)])
    keep = b.op("LessOrEqual", [j, i])
    if window:
        low = b.op("Sub", [i, b.const(np.array(window, np.int64))])
        keep = b.op("And", [keep, b.op("Greater", [j, low])])
    return keep


def _expand_heads(b: Nodes, x: str, groups: int, heads: int, last: int) -> str:
    """[B, Hkv, L, D] -> [B, Hkv·groups, L, D], each key/value head repeated for its group of query heads."""
    if groups == 1:
        return x
    x5 = b.op("Unsqueeze", [x, b.ints(2)])
    s = b.op("Shape", [x])
    shape = b.op(
        "Concat",
        [b.op("Slice", [s, b.ints(0), b.ints(2)]), b.ints(groups), b.op("Slice", [s, b.ints(2), b.ints(4)])],
        axis=0,
    )
    x5 = b.op("Expand", [x5, shape])
    return b.op("Reshape", [x5, b.ints(0, heads, -1, last)])


def emit(node: Node, ins: list[str], outs: list[str], opset: int) -> list[onnx.NodeProto]:
    a = node.attrs
    q, k, v = ins[:3]
    mask = ins[3] if a.mask != "none" else None
    qt, vt = node.kwargs["q"].type, node.kwargs["v"].type
    dt = onnx_dtype(qt)
    b = Nodes()
    keep = support_keep(b, q, k, a.causal, a.window)
    # onnxruntime's Attention adds an additive mask in a way that differs from torch on rows masked with finfo.min:
    # those (HF eager masks) take the MatMul / Softmax form at every opset.
    sinks = ins[-1] if a.has_sinks else None
    extras = ins[3 + (mask is not None) : len(ins) - (sinks is not None)]
    if opset >= 23 and not a.return_weights and a.mask != "additive" and not a.score_mod and sinks is None:
        attn_mask, causal = mask, 0
        if keep is not None and mask is None and not a.window:
            causal = 1
        elif keep is not None:
            attn_mask = _combine(b, mask, keep, a.mask, dt)
        if attn_mask is not None:  # onnxruntime wants the mask's rows spelled out (no broadcast along Lq)
            rank = node.kwargs["mask"].type.rank if mask is not None else 2
            rows = b.op(
                "Concat",
                [b.ints(*([1] * (rank - 2))), b.dim(q, 2), b.dim(k, 2)] if rank > 2 else [b.dim(q, 2), b.dim(k, 2)],
                axis=0,
            )
            attn_mask = b.op("Expand", [attn_mask, rows])
        attrs = {"scale": float(a.scale), "is_causal": causal}
        b.op("Attention", [q, k, v] + ([attn_mask] if attn_mask is not None else []), out=outs[0], **attrs)
        return b.nodes
    groups = a.heads // a.kv_heads
    k = _expand_heads(b, k, groups, a.heads, int(qt.shape[3]))
    v = _expand_heads(b, v, groups, a.heads, int(vt.shape[3]))
    s = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]), b.scalar(a.scale, dt)])
    if a.score_mod:
        s = _modify(b, score_mod.parse(a.score_mod), {"s": s, "q": q, "k": k}, extras, node, dt)
    ninf = b.scalar(float("-inf"), dt)
    if mask is not None and a.mask == "bool":
        s = b.op("Where", [mask, s, ninf])
    elif mask is not None:
        s = b.op("Add", [s, mask])
    if keep is not None:
        s = b.op("Where", [keep, s, ninf])
    if sinks is not None:  # a sink column in the softmax, dropped after it (its value is 0); no row is then empty
        col = b.op("Reshape", [sinks, b.ints(1, -1, 1, 1)])
        shape = b.op("Concat", [b.op("Shape", [s], end=3), b.ints(1)], axis=0)
        full = b.op("Concat", [s, b.op("Expand", [b.op("Cast", [col], to=dt), shape])], axis=-1)
        p = b.op("Softmax", [full], axis=-1)
        p = b.op("Slice", [p, b.ints(0), b.op("Shape", [s], start=3, end=4), b.ints(-1)])
        b.op("MatMul", [p, v], out=outs[0])
        return b.nodes
    p = b.op("Softmax", [s], axis=-1)
    if a.score_mod:  # the expression itself may rule a whole row out (an extra holding -inf): read the scores
        dead = b.op("Equal", [b.op("ReduceMax", [s, b.ints(-1)], keepdims=1), ninf])
        p = b.op("Where", [dead, b.scalar(0.0, dt), p])
    elif mask is not None or keep is not None:  # a row with no admitted column is 0 (torch's safe softmax), not NaN
        admitted = _admitted(b, mask, a.mask, keep)
        alive = b.op("ReduceMax", [b.op("Cast", [admitted], to=TensorProto.FLOAT), b.ints(-1)], keepdims=1)
        dead = b.op("Equal", [alive, b.scalar(0.0, TensorProto.FLOAT)])
        p = b.op("Where", [dead, b.scalar(0.0, dt), p])
    b.op("MatMul", [p, v], out=outs[0])
    if a.return_weights:
        b.op("Identity", [p], out=outs[1])
    return b.nodes


_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}
_UNARY = {"neg": "Neg", "tanh": "Tanh", "exp": "Exp"}


def _modify(b: Nodes, e: score_mod.Expr, env: dict[str, str], extras: list[str], node: Node, dt: int) -> str:
    """The score expression as ONNX ops over the scaled scores, the extras and the index ranges."""
    if e.op == "num":
        return b.scalar(e.value, dt)
    if e.op == "var":
        if e.name not in env:
            env[e.name] = _variable(b, e.name, env, extras, node, dt)
        return env[e.name]
    if e.op in _BINARY:
        return b.op(_BINARY[e.op], [_modify(b, x, env, extras, node, dt) for x in e.args])
    if e.op in _UNARY:
        return b.op(_UNARY[e.op], [_modify(b, e.args[0], env, extras, node, dt)])
    cond = _modify(b, e.args[0], env, extras, node, dt)
    return b.op("Where", [cond, *(_modify(b, x, env, extras, node, dt) for x in e.args[1:])])


def _variable(b: Nodes, name: str, env: dict[str, str], extras: list[str], node: Node, dt: int) -> str:
    """An extra (cast to the scores' dtype unless boolean) or an index: b [B,1,1,1], h [H,1,1], i [Lq,1], j [Lk]."""
    if name.startswith("t"):
        n = int(name[1:])
        t = node.kwargs["extras"][n].type
        same = onnx_dtype(t) in (dt, TensorProto.BOOL)
        return extras[n] if same else b.op("Cast", [extras[n]], to=dt)
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    src, axis, shape = {"b": ("q", 0, [-1, 1, 1, 1]), "h": ("q", 1, [-1, 1, 1]), "i": ("q", 2, [-1, 1]),
                        "j": ("k", 2, [-1])}[name]  # fmt: skip
    size = b.op("Squeeze", [b.dim(env[src], axis)])
    idx = b.op("Reshape", [b.op("Range", [zero, size, one]), b.ints(*shape)])
    return b.op("Cast", [idx], to=dt)


def _admitted(b: Nodes, mask: str | None, kind: str, keep: str | None) -> str:
    """Bool: where the mask and the support admit (i, j) (read from them, not from the scores, so the form stays
    the Softmax → Where → MatMul chain that importers recognise)."""
    parts = [keep] if keep is not None else []
    if mask is not None:
        parts.append(mask if kind == "bool" else b.op("Not", [b.op("IsInf", [mask], detect_positive=0)]))
    out = parts[0]
    for extra in parts[1:]:
        out = b.op("And", [out, extra])
    return out


def _combine(b: Nodes, mask: str | None, keep: str, kind: str, dt: int) -> str:
    """The user's mask and the support's as one ``Attention`` mask (bool when the user's is bool or absent)."""
    if mask is None or kind == "bool":
        return keep if mask is None else b.op("And", [mask, keep])
    return b.op("Where", [keep, mask, b.scalar(float("-inf"), dt)])
