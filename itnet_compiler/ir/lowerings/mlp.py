"""Lowering records of ``mlp`` (the native ITNet layer): ``dense``, ``fused`` (both exact), ``montecarlo``, ``lowrank``.

``dense`` materialises the [B, N, M, H_d] first-layer activations (the oracle for small sizes); ``fused`` walks tiles
of (i, j) with an online softmax and recomputes them in the backward, so memory is O(N) in the length (the torch
lowering checkpoints each row block, the Triton kernel keeps tiles on chip); ``montecarlo`` importance-samples M
columns per row with the error estimate of the generic sampler (the error model is the attention one's, with the
kernel's entropy unknown a priori: the tuner measures it).
"""

from __future__ import annotations

import sympy

from ..cost import Cost, itemsize, nbytes, out_type, role
from ..lowering import register_lowering
from ..mlp import MlpAttrs
from .options import LowRankOptions, MonteCarloOptions


def _sizes(node) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr, int]:
    """(pairs, FLOPs of every pair, bytes of the inputs and output, element size)."""
    a = node.attrs
    assert isinstance(a, MlpAttrs)
    io = nbytes(out_type(node))
    for r in ("a", "b", "rho", "gamma", "xq", "xk", "v", "mu"):
        t = role(node, r)
        io += nbytes(t) if t is not None else 0
    rho, gamma = role(node, "rho"), role(node, "gamma")
    pairs = rho.shape[0] * rho.shape[1] * gamma.shape[1] * (sympy.Rational(1, 2) if a.causal else 1)
    return pairs, a.flops(node), io, itemsize(rho)


@register_lowering("mlp", "dense", exact=True, doc="materialises the [N, M, hidden] pair activations (the oracle)")
def _(node, opts, tensors):
    pairs, flops, io, e = _sizes(node)
    return Cost(flops, io + 3 * e * pairs * node.attrs.hidden, sympy.Integer(0))


@register_lowering("mlp", "fused", exact=True, doc="tiles of (i, j), online softmax, recomputed backward: O(N) memory")
def _(node, opts, tensors):
    pairs, flops, io, e = _sizes(node)
    gamma = role(node, "gamma")
    rereads = (role(node, "rho").shape[1] / 64 + 1) * e * gamma.shape[0] * gamma.shape[1] * 3 * node.attrs.hidden
    return Cost(flops, io + rereads, sympy.Integer(0))


def _montecarlo_admits(attrs: MlpAttrs, opts: MonteCarloOptions) -> str | None:
    if opts.proposal == "lowrank":
        return "the mlp kernel has no random features for a lowrank proposal; use proposal=norm, uniform or probe"
    return None


@register_lowering(
    "mlp",
    "montecarlo",
    exact=False,
    options=MonteCarloOptions,
    admits=_montecarlo_admits,
    doc="importance sampling of M columns per row, with its own error estimate",
    error_model="unknown a priori (the kernel is learned): the tuner measures it; at run time the sampler reports "
    "its variance",
)
def _(node, opts, tensors):
    from ..cost import UNKNOWN

    pairs, flops, io, e = _sizes(node)
    rho, gamma = role(node, "rho"), role(node, "gamma")
    rows = rho.shape[0] * rho.shape[1] * sympy.Integer(opts.samples)
    per_pair = flops / (rho.shape[0] * rho.shape[1] * gamma.shape[1])
    return Cost(rows * per_pair * node.attrs.heads, io + rows * e * 4 * node.attrs.hidden, UNKNOWN)


def _lowrank_admits(attrs: MlpAttrs, opts: LowRankOptions) -> str | None:
    if opts.method not in ("learned", "nystrom"):
        return f"the mlp kernel has no {opts.method!r} factors; use lowrank:method=learned or method=nystrom"
    return None


@register_lowering(
    "mlp",
    "lowrank",
    exact=False,
    options=LowRankOptions,
    admits=_lowrank_admits,
    doc="rank-r factors: learned feature maps of the points (fitted on calibration data) or landmark rows/columns",
    error_model="unknown a priori (only the tuner, which measures, can choose it)",
)
def _(node, opts, tensors):
    from ..cost import UNKNOWN

    pairs, flops, io, e = _sizes(node)
    rho, gamma, v = role(node, "rho"), role(node, "gamma"), role(node, "v")
    r, heads, dv = sympy.Integer(opts.rank), node.attrs.heads, v.shape[3]
    points = rho.shape[0] * (rho.shape[1] + gamma.shape[1])
    work = 2 * points * heads * r * (3 * node.attrs.hidden + dv + 1)
    if opts.method == "nystrom":
        work += 2 * rho.shape[0] * heads * r * (rho.shape[1] + gamma.shape[1]) * node.attrs.pair_flops() + 10 * r**3
    return Cost(work, io + e * points * heads * r, UNKNOWN)
