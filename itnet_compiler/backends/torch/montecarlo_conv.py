"""The ``montecarlo`` lowering of ``stationary``: a convolution estimated from M sampled kernel taps per output.

On the valid direct form, y[p] = Σ_t W_t x̃[s·p + d·t] is a sum over the T taps of the kernel (the j of the one op:
the input points an output sees), each term a matrix-vector product. The unnormalised estimator
ŷ[p] = (1/M) Σ_m W_{t_m} x̃[s·p + d·t_m] / q(t_m) is unbiased, and its variance is estimated from the same M terms.
It pays off for long kernels (T ≫ M: long 1-d convolutions, S4 kernels), and is exact in expectation for any.

- ``mode=shared``: one tap set for every output point (a sparse, reweighted kernel: each distinct sampled tap is one
  shifted matrix product). ``mode=per_row``: M taps per output point, grouped by tap for the products.
- ``proposal``: ``uniform``; ``norm``, q(t) ∝ ‖W_t‖_F·‖x̃ at that tap‖ (per output point in per_row mode; over the
  whole input in shared mode: the optimal column-sampling law of sampled matrix products); ``lowrank``,
  q(t) ∝ ‖W̃_t x̃‖ with W̃ the truncated SVD of the weight, whose norm needs only the rank-r projection
  (‖U Σ Vᵀx‖ = ‖Σ Vᵀx‖ for orthonormal U). All mixed with a ``defensive`` share of uniform.

Options are those of the pair-kernel lowering (``MonteCarloOptions``); ``block`` is unused here.
"""

from __future__ import annotations

import math

import torch

from ...ir.core import Node
from .fused_conv import DirectConv, add_bias, conv_static, direct_of, point_rows, split_geometry, tap_input, tap_list
from .montecarlo import MonteCarloOptions, relative
from .registry import register
from .runtime import ErrorEstimate, cached, report_error


def _tap_weight(dc: DirectConv, t: tuple[int, ...]) -> torch.Tensor:
    """W_t as [groups, C_out/g, C_in/g]."""
    w = dc.weight[(slice(None), slice(None), *t)]
    return w.reshape(dc.groups, w.shape[0] // dc.groups, w.shape[1])


def _apply_tap(xt: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """[R, C_in] rows of tap inputs times W_t ([g, O/g, C/g]) -> [R, C_out]."""
    g, og, cg = wt.shape
    return torch.einsum("rgc,goc->rgo", xt.reshape(-1, g, cg), wt).reshape(-1, g * og)


def _svd_projection(dc: DirectConv, rank: int) -> torch.Tensor:
    """Σ_r V_rᵀ of the per-group truncated SVD of W reshaped [C_out/g, C_in/g·T]: [g, r, C_in/g, *k]."""
    g = dc.groups
    w = dc.weight.reshape(g, dc.weight.shape[0] // g, -1).double()
    _, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(rank, s.shape[-1])
    proj = s[:, :r, None] * vh[:, :r]
    return proj.reshape(g, r, *dc.weight.shape[1:]).to(dc.weight.dtype)


def _tap_scores(dc: DirectConv, opts: MonteCarloOptions, per_row: bool, layer: str, weight) -> torch.Tensor:
    """Non-negative proposal scores: [N·S, T] per output point, or [T] for the whole input."""
    taps = tap_list(dc)
    if opts.proposal == "norm":
        wnorm = torch.stack([_tap_weight(dc, t).norm() for t in taps])
        if per_row:
            return torch.stack([tap_input(dc, t).norm(dim=1).reshape(-1) for t in taps], dim=1) * wnorm
        return torch.stack([tap_input(dc, t).norm() for t in taps]) * wnorm
    proj = cached((layer, "montecarlo-svd", opts.rank), (weight,), lambda: _svd_projection(dc, opts.rank))
    cols = []
    for t in taps:
        xt = point_rows(tap_input(dc, t))
        pt = proj[(slice(None), slice(None), slice(None), *t)]  # [g, r, C/g]
        h = torch.einsum("ngc,grc->ngr", xt.reshape(xt.shape[0], dc.groups, -1), pt)
        cols.append(h.flatten(1).norm(dim=1))
    scores = torch.stack(cols, dim=1)
    return scores if per_row else scores.norm(dim=0)


def _proposal(scores: torch.Tensor | None, taps: int, alpha: float, like: torch.Tensor) -> torch.Tensor:
    """Row-normalised defensive mixture (1-α)·scores + α·uniform; shape of ``scores`` ([..., T])."""
    uniform = torch.full_like(like, 1.0 / taps, dtype=torch.float64)
    if scores is None:
        return uniform
    s = scores.double()
    tot = s.sum(-1, keepdim=True)
    mix = torch.where(tot > 0, s / tot.clamp_min(1e-300), uniform)
    return (1 - alpha) * mix + alpha * uniform


def conv_montecarlo_direct(dc: DirectConv, opts: MonteCarloOptions, layer: str, weight) -> tuple[torch.Tensor, float]:
    """The estimate [N, C_out, *S] and the summed variance of its entries."""
    taps = tap_list(dc)
    n_rows = dc.x.shape[0] * math.prod(dc.out_size)
    per_row = opts.mode == "per_row"
    gen = torch.Generator(device=dc.x.device).manual_seed(int(opts.seed))
    scores = None if opts.proposal == "uniform" else _tap_scores(dc, opts, per_row, layer, weight)
    shape = (n_rows, len(taps)) if per_row else (len(taps),)
    q = _proposal(scores, len(taps), float(opts.defensive), torch.empty(shape, device=dc.x.device))
    m = opts.samples
    if per_row:
        draws = torch.multinomial(q, m, replacement=True, generator=gen)
        counts = torch.zeros_like(q).scatter_add_(1, draws, torch.ones_like(draws, dtype=q.dtype))
    else:
        draws = torch.multinomial(q, m, replacement=True, generator=gen)
        counts = torch.bincount(draws, minlength=len(taps)).to(q.dtype)
    y = dc.x.new_zeros(n_rows, dc.weight.shape[0])
    sumsq = torch.zeros(n_rows, dtype=torch.float64, device=dc.x.device)
    for ti, t in enumerate(taps):
        c = counts[:, ti] if per_row else counts[ti]
        if not bool((c > 0).any()):
            continue
        xt, wt = point_rows(tap_input(dc, t)), _tap_weight(dc, t)
        if per_row:
            rows = torch.nonzero(c).flatten()
            z = _apply_tap(xt[rows], wt) / q[rows, ti, None].to(y.dtype)
            y.index_add_(0, rows, z * (c[rows, None].to(y.dtype) / m))
            sumsq.index_add_(0, rows, c[rows] * z.double().pow(2).sum(1))
        else:
            z = _apply_tap(xt, wt) / float(q[ti].detach())  # shared mode: 1/q is a constant of the estimate
            y += z * (float(c) / m)
            sumsq += float(c) * z.double().pow(2).sum(1)
    var = (sumsq - m * y.double().pow(2).sum(1)).clamp_min(0.0) / (m * (m - 1))
    out = y.reshape(dc.x.shape[0], *dc.out_size, -1).movedim(-1, 1)
    return out, float(var.detach().sum())  # the error estimate is a report, not part of the graph


def conv_montecarlo(x, weight, bias=None, *, layer="", return_error=False, **kw):
    """Unbiased sampled convolution; with ``return_error`` also its ``ErrorEstimate``."""
    geometry, options = split_geometry(kw)
    opts = MonteCarloOptions.make(layer, **options)
    dc = direct_of(x, weight, geometry, layer)
    y, var = conv_montecarlo_direct(dc, opts, layer, weight)
    err = math.sqrt(var)
    out = add_bias(y, bias)
    est = ErrorEstimate(abs=err, rel=relative(err, out), samples=opts.samples)
    report_error(layer, est)
    return (out, est) if return_error else out


@register("stationary", "montecarlo")
def _(node: Node, opts: object):
    return conv_montecarlo, conv_static(node)
