"""Attention written out in ONNX (MatMul → scale → bias / mask → Softmax → MatMul, as exporters and ONNX's own
``Attention`` function body write it) found in the graph and computed by SDPA, so the torch frontend captures it as
a ``dot_exp`` transform. The chain may scale q and k separately (by √scale each), scale the scores before or after
additive biases, mask with ``Where(keep, s, -inf)``, cast between float types, and guard fully masked rows with
``Where(rowmax == -inf, 0, p)``. The fused node keeps the original nodes: when a scale is not a constant at run time
it evaluates them unchanged, so the rewrite never changes what the graph computes."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .onnx_ops import OPS, OnnxNode, Static, as_tensor

_FLOAT_CAST = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


class FusedAttention:
    """A matched chain: q, k (transposed back), v, scale factors, biases and keep-masks, and the original nodes."""

    op_type = "FusedAttention"
    module = None

    def __init__(self, nodes: list[OnnxNode], inputs: list[str], output: str, plan: dict):
        self.nodes, self.inputs, self.outputs, self.plan = nodes, inputs, [output], plan
        self.name = nodes[-1].name
        self.opset = nodes[-1].opset


def _scalar(v: object) -> float | None:
    if isinstance(v, Static) and v.arr.size == 1 and v.arr.dtype != object:
        return float(v.arr.reshape(()))
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not isinstance(v, torch._subclasses.FakeTensor):
        try:
            return float(v.reshape(()))
        except Exception:
            return None
    return None


def run_fused(f: FusedAttention, env: dict[str, object]) -> object:
    p = f.plan
    factors = [_scalar(env[name]) for name in p["scales"]]
    if any(x is None for x in factors):
        return _run_original(f, env)
    q, k, v = (as_tensor(env[p[r]]) for r in ("q", "k", "v"))
    scale = 1.0
    for x, kind in zip(factors, p["kinds"], strict=True):
        scale = scale * x if kind == "mul" else scale / x
    mask = None
    for name, factor_at in p["biases"]:
        b = as_tensor(env[name]).to(q.dtype)
        mult = 1.0
        for x, kind in list(zip(factors, p["kinds"], strict=True))[factor_at:]:
            if kind == "mul":
                mult *= x
            else:
                mult /= x
        b = b * mult if mult != 1.0 else b  # the scales applied after the bias scale it too
        mask = b if mask is None else mask + b
    keep = None
    for name, keep_if in p["keeps"]:
        c = as_tensor(env[name]).bool()
        c = c if keep_if else ~c
        keep = c if keep is None else keep & c
    if keep is not None:
        base = mask if mask is not None else torch.zeros((), dtype=q.dtype)
        mask = torch.where(keep, base, torch.full((), -math.inf, dtype=q.dtype))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if p["safe"] and mask is not None:  # rows that admit no key are 0, as the graph's guard makes them
        dead = torch.isneginf(mask).all(-1, keepdim=True) if mask.dtype != torch.bool else ~mask.any(-1, keepdim=True)
        y = y.masked_fill(dead, 0.0)
    return y.to(p["out_dtype"]) if p["out_dtype"] is not None else y


def _run_original(f: FusedAttention, env: dict[str, object]) -> object:
    local = dict(env)
    for n in f.nodes:
        args = [local[x] if x else None for x in n.inputs]
        out = OPS[n.op_type](n, *args)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        for name, val in zip(n.outputs, outs, strict=False):
            if name:
                local[name] = val
    return local[f.outputs[0]]


def fuse(nodes: list[OnnxNode], graph_outputs: set[str], consts: dict[str, np.ndarray]) -> list:
    """``nodes`` with each matched attention chain replaced by one FusedAttention (``consts``: the values of
    Constant nodes and initializers by name)."""
    producer = {o: n for n in nodes for o in n.outputs if o}
    users: dict[str, list[OnnxNode]] = {}
    for n in nodes:
        for x in n.inputs:
            if x:
                users.setdefault(x, []).append(n)
    replaced: dict[int, FusedAttention] = {}
    drop: set[int] = set()
    for s in nodes:
        if s.op_type != "Softmax" or s.opset < 13 or s.attr("axis", -1) not in (-1, 3):
            continue
        m = _match(s, producer, users, graph_outputs, consts)
        if m is None:
            continue
        chain, inputs, out, plan = m
        if any(id(n) in drop for n in chain):
            continue
        fused = FusedAttention(chain, inputs, out, plan)
        replaced[id(chain[-1])] = fused
        drop.update(id(n) for n in chain[:-1])
    return [replaced.get(id(n), n) for n in nodes if id(n) not in drop]


def _single(name: str, users, graph_outputs) -> bool:
    return len(users.get(name, [])) == 1 and name not in graph_outputs


def _match(s: OnnxNode, producer, users, graph_outputs, consts):
    chain: list[OnnxNode] = [s]
    scales: list[str] = []
    kinds: list[str] = []
    biases: list[tuple[str, int]] = []
    keeps: list[tuple[str, bool]] = []
    cur = s.inputs[0]
    while True:  # backwards from the softmax to the q·kᵀ MatMul; scales and biases in application order, reversed
        n = producer.get(cur)
        if n is None or not _single(cur, users, graph_outputs):
            return None
        if n.op_type == "MatMul":
            mm = n
            break
        if n.op_type == "Cast" and n.attr("to") in _FLOAT_CAST:
            cur = n.inputs[0]
        elif n.op_type == "Div" and _to_matmul(n.inputs[0], producer):
            scales.append(n.inputs[1])
            kinds.append("div")
            cur = n.inputs[0]
        elif n.op_type == "Mul" and (_to_matmul(n.inputs[0], producer) or _to_matmul(n.inputs[1], producer)):
            side = 0 if _to_matmul(n.inputs[0], producer) else 1
            scales.append(n.inputs[1 - side])
            kinds.append("mul")
            cur = n.inputs[side]
        elif n.op_type == "Add" and (_to_matmul(n.inputs[0], producer) or _to_matmul(n.inputs[1], producer)):
            side = 0 if _to_matmul(n.inputs[0], producer) else 1
            biases.append((n.inputs[1 - side], len(scales)))
            cur = n.inputs[side]
        elif n.op_type == "Where" and _is_neg_inf_const(n.inputs[2], consts):
            keeps.append((n.inputs[0], True))
            cur = n.inputs[1]
        elif n.op_type == "Where" and _is_neg_inf_const(n.inputs[1], consts):
            keeps.append((n.inputs[0], False))
            cur = n.inputs[2]
        else:
            return None
        chain.append(n)
    chain.append(mm)
    # scales recorded from the softmax backwards: a bias seen after k scales is applied before the last k of them
    scales.reverse()
    kinds.reverse()
    biases = [(b, len(scales) - at) for b, at in biases]
    q, kt = mm.inputs
    q, q_scales = _peel_scale(q, producer, users, graph_outputs, chain)
    kt_node = producer.get(kt)
    k_scales: list[str] = []
    if kt_node is not None and kt_node.op_type == "Mul" and _single(kt, users, graph_outputs):
        chain.append(kt_node)
        kt, k_scales = kt_node.inputs[0], [kt_node.inputs[1]]
        kt_node = producer.get(kt)
    if kt_node is None or kt_node.op_type != "Transpose" or not _single(kt, users, graph_outputs):
        return None
    perm = list(kt_node.attr("perm") or [])
    if len(perm) < 2 or perm[-2:] != [len(perm) - 1, len(perm) - 2] or perm[:-2] != list(range(len(perm) - 2)):
        return None
    chain.append(kt_node)
    k = kt_node.inputs[0]
    # after the softmax: casts, an optional fully-masked-row guard, then P·V
    cur, safe, out_dtype = s.outputs[0], False, None
    tail: list[OnnxNode] = []
    while True:
        us = users.get(cur, [])
        if cur in graph_outputs or not us:
            return None
        likes = [u for u in us if u.op_type == "CastLike" and u.inputs[1] == cur]  # reads the dtype only
        tail += likes
        us = [u for u in us if u not in likes]
        if len(us) != 1:
            return None
        u = us[0]
        if u.op_type == "Cast" and u.attr("to") in _FLOAT_CAST:
            tail.append(u)
            cur = u.outputs[0]
            continue
        if u.op_type == "Where" and u.inputs[2] == cur:
            tail.append(u)
            safe, cur = True, u.outputs[0]
            continue
        if u.op_type == "MatMul" and u.inputs[0] == cur:
            pv = u
            break
        return None
    if tail and tail[-1].op_type == "Cast":
        from .onnx_import import torch_dtype

        out_dtype = torch_dtype(tail[-1].attr("to"), "a Cast")
    v = pv.inputs[1]
    order = [*reversed(chain), *tail, pv]
    all_scales = q_scales + k_scales + scales
    plan = {"q": q, "k": k, "v": v, "scales": all_scales, "kinds": ["mul"] * (len(q_scales) + len(k_scales)) + kinds,
            "biases": [(b, at + len(q_scales) + len(k_scales)) for b, at in biases], "keeps": keeps, "safe": safe,
            "out_dtype": out_dtype}  # fmt: skip
    inputs = [q, k, v, *all_scales, *(b for b, _ in biases), *(c for c, _ in keeps)]
    needed = {x for n in order for x in n.inputs if x}
    produced = {o for n in order for o in n.outputs if o}
    inputs = list(dict.fromkeys([*inputs, *sorted(needed - produced)]))
    return order, inputs, pv.outputs[0], plan


def _peel_scale(q: str, producer, users, graph_outputs, chain) -> tuple[str, list[str]]:
    n = producer.get(q)
    if n is not None and n.op_type == "Mul" and _single(q, users, graph_outputs):
        chain.append(n)
        return n.inputs[0], [n.inputs[1]]
    return q, []


def _to_matmul(name: str, producer, depth: int = 8) -> bool:
    """Whether ``name`` is the score chain: it reaches a MatMul through casts, scales, biases and masks."""
    n = producer.get(name)
    for _ in range(depth):
        if n is None:
            return False
        if n.op_type == "MatMul":
            return True
        if n.op_type not in ("Cast", "Mul", "Div", "Add", "Where"):
            return False
        srcs = n.inputs[1:] if n.op_type == "Where" else n.inputs[:1] if n.op_type in ("Cast", "Div") else n.inputs
        nexts = [producer.get(x) for x in srcs if x]
        hit = next(
            (m for m in nexts if m is not None and m.op_type in ("MatMul", "Cast", "Mul", "Div", "Add", "Where")), None
        )
        n = hit
    return False


def _is_neg_inf_const(name: str, consts: dict[str, np.ndarray]) -> bool:
    arr = consts.get(name)
    if arr is None:
        return False
    arr = np.asarray(arr)
    return arr.size == 1 and arr.dtype.kind == "f" and bool(np.isneginf(arr).all())
