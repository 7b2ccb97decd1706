"""Lowering records of ``dot_exp`` (softmax attention): options, admissibility, cost rules and error models.

Error models (relative Frobenius error of the layer's output, before any measurement): exact lowerings 0;
``montecarlo`` sqrt(L_k / (e^H·M)) with H = ``ATTENTION_ENTROPY`` nats (trained models have H ≤ 3; measured errors of
random peaked attention sit near this); ``hybrid`` unknown before a measurement (its kept blocks cover the mass that
structure puts in them, which no formula over shapes knows: the tuner measures it, and its run-time estimate reports
it); ``lowrank`` unknown (∞): only the tuner, which measures, can choose it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy

from .. import score_mod
from ..core import Node
from ..cost import UNKNOWN, Cost, evaluate, itemsize, nbytes, out_type, role
from ..families import DotExpAttrs
from ..lowering import register_lowering
from .options import HybridOptions, LowRankOptions, MonteCarloOptions

ATTENTION_ENTROPY = 3.0


def _no_weights(attrs: DotExpAttrs, opts: object) -> str | None:
    if attrs.return_weights:
        return "the layer returns its attention weights, which only dense and library materialise"
    return None


def _approx_admits(attrs: DotExpAttrs, opts: object) -> str | None:
    if attrs.window:
        return "it has no sliding-window support; use fused, dense or library"
    if attrs.score_mod:
        return f"it has no place for the score modification {attrs.score_mod!r}; use fused or dense"
    if attrs.has_sinks:
        return "it has no place for attention sinks; use fused or dense"
    return _no_weights(attrs, opts)


def _library_admits(attrs: DotExpAttrs, opts: object) -> str | None:
    if attrs.score_mod:
        return f"SDPA has no place for the score modification {attrs.score_mod!r}; use fused or dense"
    if attrs.has_sinks:
        return "SDPA has no place for attention sinks; use fused or dense"
    return None


@dataclass(frozen=True)
class _Attn:
    bh: sympy.Expr
    lq: sympy.Expr
    lk: sympy.Expr
    d: sympy.Expr
    dv: sympy.Expr
    io: sympy.Expr  # bytes of q, k, v, mask and the output
    e: int
    mod: int  # operations of the score modification per pair
    causal: bool
    keep: sympy.Expr  # the share of (i, j) pairs the support admits: 1, 1/2 (causal), exact count for window(r)


def _attn(node: Node) -> _Attn:
    a = node.attrs
    assert isinstance(a, DotExpAttrs)
    q, k, v = role(node, "q"), role(node, "k"), role(node, "v")
    assert q is not None and k is not None and v is not None
    io = nbytes(q) + nbytes(k) + nbytes(v) + nbytes(out_type(node))
    mask = role(node, "mask")
    if mask is not None:
        io += nbytes(mask)
    for t in node.kwargs.get("extras") or ():
        io += nbytes(t.type)
    mod = score_mod.ops(score_mod.parse(a.score_mod)) if a.score_mod else 0
    b, h, lq, d = q.shape
    lk = k.shape[2]
    keep = a.window_pairs(lq) / (lq * lk) if a.window else (sympy.Rational(1, 2) if a.causal else sympy.Integer(1))
    return _Attn(b * h, lq, lk, d, v.shape[3], io, itemsize(q), mod, a.causal, keep)


def _softmax_flops(s: _Attn) -> sympy.Expr:
    return 2 * s.bh * s.lq * s.lk * (s.d + s.dv) + (5 + s.mod) * s.bh * s.lq * s.lk


@register_lowering("dot_exp", "dense", exact=True, doc="materialises the [L_q, L_k] weights (the oracle)")
def _(node, opts, tensors):
    s = _attn(node)
    return Cost(_softmax_flops(s), s.io + 4 * s.e * s.bh * s.lq * s.lk, sympy.Integer(0))


@register_lowering(
    "dot_exp",
    "library",
    exact=True,
    admits=_library_admits,
    doc="torch scaled_dot_product_attention (cuDNN / flash on a GPU)",
)
def _(node, opts, tensors):
    s = _attn(node)
    if node.attrs.return_weights:
        return Cost(_softmax_flops(s), s.io + 4 * s.e * s.bh * s.lq * s.lk, sympy.Integer(0))
    if node.attrs.window:  # SDPA has no window: it gets an N² bool mask and computes every pair
        return Cost(_softmax_flops(s), s.io + s.lq * s.lk, sympy.Integer(0))
    flops = _softmax_flops(s) * s.keep
    return Cost(flops, s.io, sympy.Integer(0))


@register_lowering(
    "dot_exp", "fused", exact=True, admits=_no_weights, doc="tiles of (i, j), online softmax: O(N) memory"
)
def _(node, opts, tensors):
    if node.attrs.return_weights:
        return None
    s = _attn(node)
    block_q = 256  # k and v are reread once per query tile; 256 rows is the order of every target's tile
    flops = _softmax_flops(s) * s.keep
    rereads = (s.lq / block_q + 1) * s.e * s.bh * s.lk * (s.d + s.dv)  # k and v once per query tile
    return Cost(flops, s.io + rereads, sympy.Integer(0))


def _mc_attention_error(s: _Attn, samples: sympy.Expr) -> sympy.Expr:
    return sympy.sqrt(s.lk / (sympy.exp(ATTENTION_ENTROPY) * samples))


def _fit_mc_attention(node, budget, sizes, tensors):
    if node.attrs.return_weights or budget <= 0:
        return None
    s = _attn(node)
    lk = evaluate(s.lk, sizes)
    m = math.ceil(lk / (math.exp(ATTENTION_ENTROPY) * budget**2))
    return {"samples": max(m, 16)} if m < lk else None  # as many samples as columns: exact is cheaper


@register_lowering(
    "dot_exp",
    "montecarlo",
    exact=False,
    options=MonteCarloOptions,
    admits=_approx_admits,
    fit=_fit_mc_attention,
    doc="self-normalised importance sampling of M columns per row, with its own error estimate",
    error_model="sqrt(L_k / (e^H·M)), H = ATTENTION_ENTROPY nats: M uniform samples land ~M·e^H/L_k times on a row's "
    "e^H effective columns",
)
def _(node, opts, tensors):
    if node.attrs.return_weights:
        return None
    s = _attn(node)
    m = sympy.Integer(opts.samples)
    rank = opts.rank
    rows = s.bh * s.lq * m
    proposal = opts.proposal
    probe_rows = s.bh * s.lq / opts.group * opts.probes  # each scored exactly against every column
    setup = {"uniform": 0, "norm": 2 * s.bh * s.lk * (s.d + s.dv), "lowrank": 2 * s.bh * (s.lq + s.lk) * rank * s.d,
             "probe": probe_rows * s.lk * (2 * s.d + 8)}  # fmt: skip
    if opts.mode == "shared":
        flops = rows * (2 * s.d + 4 * s.dv + 8) + setup[proposal]
        moved = s.io + s.e * (rows + s.bh * m * (s.d + s.dv))
    else:  # a gather of k and v per sample, and an inverse-CDF search over L_k
        search = sympy.log(s.lk, 2) + (2 * rank if proposal == "lowrank" else 0)
        flops = rows * (2 * s.d + 4 * s.dv + 8 + search) + setup[proposal]
        moved = s.io + rows * (s.e * (s.d + s.dv) + 8)
    return Cost(flops, moved, _mc_attention_error(s, m))


@register_lowering(
    "dot_exp",
    "lowrank",
    exact=False,
    options=LowRankOptions,
    admits=_approx_admits,
    doc="rank-r factorisation of the kernel (FAVOR+, Nyström, learned features)",
    error_model="unknown a priori (only the tuner, which measures, can choose it)",
)
def _(node, opts, tensors):
    if node.attrs.return_weights:
        return None
    s = _attn(node)
    r = sympy.Integer(opts.rank)
    features = 2 * s.bh * (s.lq + s.lk) * r * s.d + 2 * s.bh * (s.lq + s.lk) * r
    apply = 2 * s.bh * s.lk * r * (s.dv + 1) + 2 * s.bh * s.lq * r * (s.dv + 1)
    if opts.method == "nystrom":
        features += 10 * s.bh * r**3
    if s.causal:
        apply += 2 * s.bh * s.lq * opts.chunk * (r + s.dv)
    return Cost(features + apply, s.io + s.e * s.bh * (s.lq + s.lk) * r, UNKNOWN)


@register_lowering(
    "dot_exp",
    "hybrid",
    exact=False,
    options=HybridOptions,
    admits=_approx_admits,
    doc="exact key blocks chosen per query block by probe rows, the uncovered rest importance-sampled",
    error_model="unknown a priori: the share of mass the kept blocks hold depends on the data (run-time estimate: "
    "the larger of the sampling variance and the probe rows' measured error)",
)
def _(node, opts, tensors):
    if node.attrs.return_weights:
        return None
    s = _attn(node)
    bs = sympy.Integer(opts.block)
    nq = s.lq / bs
    cols = sympy.Min(sympy.Integer(opts.blocks) * bs, s.lk * (sympy.Rational(1, 2) + 1 / (2 * nq) if s.causal else 1))
    probes = 2 * s.bh * nq * opts.probes * s.lk * (s.d + s.dv) + 5 * s.bh * nq * opts.probes * s.lk
    kept = 2 * s.bh * s.lq * (cols + opts.samples) * (s.d + s.dv) + 5 * s.bh * s.lq * (cols + opts.samples)
    gathered = s.e * s.bh * nq * (cols + opts.samples) * (s.d + s.dv)  # each query block's key set, read once
    return Cost(probes + kept, s.io + gathered + 4 * s.bh * nq * s.lk * opts.probes, UNKNOWN)
