"""Lowering records of ``stationary`` (every convolution): options, cost rules and error models.

Error models (relative Frobenius error of the layer's output, before any measurement): exact lowerings 0 (``fft``:
round-off only); ``montecarlo`` over the T taps: sqrt((T - 1) / M), the error of sampling M of T terms of equal size
and incoherent signs (the estimator's variance is (T·Σ‖z_t‖² - ‖y‖²)/M); with the weight at hand and the norm
proposal, T becomes the effective tap count (Σ‖W_t‖)² / Σ‖W_t‖²; ``lowrank`` by ``svd``: the weight's own truncation
error sqrt(Σ_{i>r} σ_i² / Σ σ_i²), exact for white inputs (needs the weight tensor; unknown without it); ``cp``,
``spatial`` and ``learned``: unknown (∞).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy
import torch

from ..core import Node
from ..cost import UNKNOWN, Cost, TensorLookup, itemsize, nbytes, out_type, role
from ..families import StationaryAttrs
from ..lowering import register_lowering
from ..types import numel
from .options import ConvLowRankOptions, MonteCarloOptions


@dataclass(frozen=True)
class _Conv:
    n: sympy.Expr
    cin: sympy.Expr
    cout: sympy.Expr
    taps: int
    groups: int
    points: sympy.Expr  # output points per image
    in_points: sympy.Expr  # input points per image, after padding (and upsampling when transposed)
    io: sympy.Expr
    e: int
    direct: sympy.Expr  # FLOPs of the direct convolution


def _conv(node: Node) -> _Conv:
    a = node.attrs
    assert isinstance(a, StationaryAttrs)
    x, w = role(node, "x"), role(node, "weight")
    assert x is not None and w is not None
    out = out_type(node)
    k = w.shape[2:]
    taps = math.prod(int(t) for t in k)
    io = nbytes(x) + nbytes(w) + nbytes(out)
    if a.transposed:
        ins = [
            (n - 1) * s + 1 + 2 * (d * (kk - 1)) - 2 * p[0] + op
            for n, s, d, kk, p, op in zip(
                x.shape[2:], a.stride, a.dilation, k, a.padding, a.output_padding, strict=True
            )
        ]
    else:
        ins = [n + p[0] + p[1] for n, p in zip(x.shape[2:], a.padding, strict=True)]
    return _Conv(
        n=x.shape[0],
        cin=x.shape[1],
        cout=out.shape[1],
        taps=taps,
        groups=a.groups,
        points=sympy.Mul(*out.shape[2:]),
        in_points=sympy.Mul(*ins),
        io=io,
        e=itemsize(x),
        direct=2 * numel(out) * (x.shape[1] / a.groups) * taps,
    )


@register_lowering("stationary", "library", exact=True, doc="torch conv (cuDNN / oneDNN)")
def _(node, opts, tensors):
    c = _conv(node)
    return Cost(c.direct, c.io, sympy.Integer(0))


@register_lowering("stationary", "dense", exact=True, doc="im2col then one matrix product (the oracle)")
def _(node, opts, tensors):
    c = _conv(node)
    im2col = c.e * c.n * c.cin * c.taps * c.points
    return Cost(c.direct, c.io + 2 * im2col, sympy.Integer(0))


@register_lowering("stationary", "fused", exact=True, doc="implicit GEMM over taps: no im2col buffer")
def _(node, opts, tensors):
    c = _conv(node)
    return Cost(c.direct, c.io + 2 * c.e * c.n * c.cin * c.in_points, sympy.Integer(0))


@register_lowering(
    "stationary", "fft", exact=True, doc="pointwise product of spectra: O(N log N)", error_model="round-off only"
)
def _(node, opts, tensors):
    c = _conv(node)
    q = c.in_points
    transforms = c.n * c.cin + c.cout * c.cin / c.groups + c.n * c.cout
    flops = 5 * q * sympy.log(q, 2) * transforms + 8 * c.n * c.cout * (c.cin / c.groups) * q / 2
    spectra = 2 * c.e * transforms * q  # complex half spectra: q/2 bins of 2 reals each, written and read
    return Cost(flops, c.io + spectra, sympy.Integer(0))


def effective_taps(weight: torch.Tensor) -> float:
    """(Σ_t ‖W_t‖)² / Σ_t ‖W_t‖²: T for a flat kernel, far fewer for a decaying one (a long conv, an S4 kernel)."""
    norms = weight.detach().double().flatten(0, 1).norm(dim=0).flatten()
    return float(norms.sum() ** 2 / norms.pow(2).sum().clamp_min(1e-300))


def _mc_conv_error(c: _Conv, samples: int, tensors: TensorLookup | None) -> tuple[sympy.Expr, str]:
    """sqrt((T_eff - 1)/M) with the norm proposal when the weight is known (q(t) ∝ ‖W_t‖ for stationary inputs),
    else sqrt((T - 1)/M) with the uniform one."""
    w = tensors("weight") if tensors is not None else None
    if w is None:
        return sympy.sqrt(sympy.Integer(c.taps - 1) / samples), "uniform"
    return sympy.Float(math.sqrt(max(effective_taps(w) - 1.0, 0.0) / samples)), "norm"


def _fit_mc_conv(node, budget, sizes, tensors):
    if budget <= 0:
        return None
    c = _conv(node)
    unit, proposal = _mc_conv_error(c, 1, tensors)
    m = max(2, math.ceil(float(unit) ** 2 / budget**2))
    return {"samples": m, "proposal": proposal} if m < c.taps else None


@register_lowering(
    "stationary",
    "montecarlo",
    exact=False,
    options=MonteCarloOptions,
    fit=_fit_mc_conv,
    doc="importance sampling of M of the T taps, with its own error estimate",
    error_model="sqrt((T - 1) / M); with the weight and the norm proposal T is the effective tap count "
    "(Σ‖W_t‖)² / Σ‖W_t‖²",
)
def _(node, opts, tensors):
    c = _conv(node)
    m = opts.samples
    distinct = min(m, c.taps)
    per_tap = 2 * c.n * c.points * c.cout * c.cin / c.groups
    flops = per_tap * (m if opts.mode == "per_row" else distinct)
    moved = c.io + c.e * c.n * c.cin * c.points * distinct
    error, proposal = _mc_conv_error(c, m, tensors)
    if opts.proposal != proposal and proposal == "norm":
        error = sympy.sqrt(sympy.Integer(c.taps - 1) / m)  # the weight-aware bound holds for the norm proposal only
    return Cost(flops, moved, error)


def svd_error(weight: torch.Tensor, groups: int, transposed: bool) -> list[float]:
    """Relative truncation error of the channel SVD at rank r = 1, 2, ... (the worst group), from the spectrum."""
    w = weight
    if transposed:  # [C_in, C_out/g, *k] -> the direct form's [C_out, C_in/g, *k] up to a flip
        cin, coutg = w.shape[:2]
        w = w.reshape(groups, cin // groups, coutg, -1).transpose(1, 2).reshape(groups * coutg, cin // groups, -1)
    mats = w.reshape(groups, w.shape[0] // groups, -1).double()
    s2 = torch.linalg.svdvals(mats).pow(2)  # [g, min]
    tail = s2.flip(-1).cumsum(-1).flip(-1)  # Σ_{i>=r} σ²
    rel = (tail / s2.sum(-1, keepdim=True).clamp_min(1e-300)).sqrt()
    worst = rel.amax(0).tolist()
    return worst[1:] + [0.0]  # rank r keeps r values: its error is the tail from index r


def _fit_svd(node, budget, sizes, tensors):
    if budget <= 0 or tensors is None:
        return None
    w = tensors("weight")
    if w is None:
        return None
    a = node.attrs
    errs = svd_error(w, a.groups, a.transposed)
    full = len(errs)
    for r, e in enumerate(errs, start=1):
        if e <= budget and r < full:
            return {"method": "svd", "rank": r}
    return None


@register_lowering(
    "stationary",
    "lowrank",
    exact=False,
    options=ConvLowRankOptions,
    fit=_fit_svd,
    doc="low-rank factorisation of the weight (channel SVD, spatial, CP, learned)",
    error_model="svd: the weight's own truncation error sqrt(Σ_{i>r} σ_i² / Σ σ_i²) (exact for white inputs); "
    "other methods unknown",
)
def _(node, opts, tensors):
    c = _conv(node)
    a = node.attrs
    r = opts.rank
    method = opts.method
    g = c.groups
    cin_g, cout_g = c.cin / g, c.cout / g
    if method == "cp":
        per_point = g * r * (cin_g + cout_g + sum(int(k) for k in role(node, "weight").shape[2:]))
    else:
        per_point = g * r * (cin_g * c.taps + cout_g)
    flops = 2 * c.n * c.points * per_point
    moved = c.io + 2 * c.e * c.n * g * r * c.in_points
    error: sympy.Expr = UNKNOWN
    w = tensors("weight") if tensors is not None else None
    if method == "svd" and w is not None:
        errs = svd_error(w, a.groups, a.transposed)
        error = sympy.Float(errs[min(r, len(errs)) - 1])
    return Cost(flops, moved, error)
