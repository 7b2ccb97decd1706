"""Triton lowerings of ``stationary`` that approximate: ``lowrank`` (a chain of smaller convolutions) and
``montecarlo`` (sampled taps, shared mode).

- ``lowrank``: the factorisation (svd / spatial / cp / learned) is the torch lowering's own (``chain_for``: the
  same ``cached`` key, so one ``RuntimeState`` holds one set of factors for both backends and the numbers are the
  same); each convolution of the chain then runs through the Triton stationary kernels (depthwise or implicit GEMM,
  with their backward kernels). The factors are differentiable functions of the weight (and, for ``learned``, of the
  calibration input), so gradients reach the layer's weight through them exactly as in the torch lowering. A chain
  step the Triton conv does not take runs on torch and is recorded in ``TORCH_STEPS`` (one warning per layer).
- ``montecarlo`` with ``mode=shared``: the taps are drawn in torch exactly as the torch lowering draws them (same
  generator, proposal and order), then ``templates.stationary_mc`` computes the estimate as an implicit GEMM over the
  distinct drawn taps only, with the two row sums of its variance estimate, reported as the layer's
  ``ErrorEstimate``. The backward (dx, dw through the same taps and importance weights) is what autograd gives the
  torch lowering, whose weights 1/q enter as constants. ``mode=per_row`` is not here: its torch autograd also
  differentiates through the per-row proposal, so ``montecarlo_supported`` names it and the layer falls back.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import torch
import triton

from ..torch.fused_conv import direct_of, split_geometry, tap_list
from ..torch.lowrank_conv import ConvLowRankOptions, chain_for
from ..torch.montecarlo import MonteCarloOptions, relative
from ..torch.montecarlo_conv import _proposal, _tap_scores
from ..torch.runtime import ErrorEstimate, report_error
from . import conv, loader
from .templates.stationary_mc import STATIONARY_MC, STATIONARY_MC_KERNEL

CONV_TILES = {"block_c", "block_l", "num_warps", "block_m", "block_n", "block_k", "num_stages"}
LOWRANK_OPTIONS = {f.name for f in fields(ConvLowRankOptions)} | CONV_TILES
MC_TILES = {"block_m", "block_n", "block_k", "num_warps", "num_stages"}
MONTECARLO_OPTIONS = {f.name for f in fields(MonteCarloOptions)} | MC_TILES
# Layer -> why some of its chain steps ran on torch (the layer itself is not a fallback: its other steps ran here).
TORCH_STEPS: dict[str, str] = {}


def _split(options: dict[str, object], semantic: set[str]) -> tuple[dict[str, object], dict[str, object]]:
    return {k: v for k, v in options.items() if k in semantic}, {k: v for k, v in options.items() if k not in semantic}


def lowrank_supported(x, weight, **static: object) -> str | None:
    """The layer runs here when the Triton conv takes its geometry (1-d and 2-d today); single steps may not."""
    return conv.supported(x, weight, **static)


def conv_lowrank(x, weight, bias=None, *, layer="", **kw):
    geometry, options = split_geometry(kw)
    semantic, tiles = _split(options, {f.name for f in fields(ConvLowRankOptions)})
    opts = ConvLowRankOptions.make(layer, **semantic)
    dc = direct_of(x, weight, geometry, layer)
    chain = chain_for(dc, weight, opts, layer)
    y = dc.x
    for i, (w, s, d, g) in enumerate(chain.steps):
        last = i == len(chain.steps) - 1
        y = _chain_step(y, w.to(y.dtype), bias if last else None, s, d, g, tiles, layer)
    return y


def _chain_step(x, w, bias, stride, dilation, groups, tiles, layer: str) -> torch.Tensor:
    rank = x.dim() - 2
    static = {"stride": tuple(stride), "padding": ((0, 0),) * rank, "dilation": tuple(dilation), "groups": groups,
              "transposed": False, "output_padding": (0,) * rank, "padding_mode": "zeros"}  # fmt: skip
    reason = conv.supported(x, w, **static)
    if reason is None:
        return conv.stationary_conv(x, w, bias, **static, **tiles)
    if layer not in TORCH_STEPS:
        TORCH_STEPS[layer] = reason
        warnings.warn(f"itnet: a lowrank chain step of layer '{layer}' runs on torch: {reason}", stacklevel=2)
    step = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[rank]
    return step(x, w, bias, stride, 0, dilation, groups)


# ---- montecarlo (shared taps) ----


@dataclass(frozen=True)
class McTiles:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3

    @staticmethod
    def default(device: torch.device) -> McTiles:
        return McTiles() if device.type == "cuda" else McTiles(128, 32, 32, 1, 1)


def mc_kernels():
    source = loader.render(
        STATIONARY_MC, {"TITLE": "stationary montecarlo (shared taps)", "KERNEL": STATIONARY_MC_KERNEL}
    )
    return loader.load("stationary_montecarlo", source)


def montecarlo_supported(x, weight, *, mode: str = MonteCarloOptions.mode, **static: object) -> str | None:
    if mode != "shared":
        return (f"montecarlo mode={mode} has no Triton kernel for convolutions (its gradient runs through the "
                "per-row proposal); use mode=shared")  # fmt: skip
    if x.dim() not in (3, 4):
        return "the sampled-taps kernel takes 1-d and 2-d convolutions"
    return conv.supported(x, weight, **static)


def _as2d(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(2) if t.dim() == 3 else t


def _geom(stride, dilation) -> dict[str, int]:
    s, d = ((1, *stride), (1, *dilation)) if len(stride) == 1 else (stride, dilation)
    return {"SH": s[0], "SW": s[1], "DH": d[0], "DW": d[1]}


def _launch(name, grid, tiles: McTiles, *args, **kw) -> None:
    blocks = {"BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_K": tiles.block_k}
    getattr(mc_kernels(), name)[grid](*args, **kw, **blocks, num_warps=tiles.num_warps, num_stages=tiles.num_stages)


class _SampledTaps(torch.autograd.Function):
    """y = Σ_s a_s conv_{t_s}(x̃, W) over a valid input; returns (y, SQ, YS) with the row sums of the variance."""

    @staticmethod
    def forward(ctx, x, weight, bias, taps, scale, sqw, stride, dilation, groups, out_size, tiles):
        rank = x.dim() - 2
        x2, w4 = _as2d(x), _as2d(weight)
        n, cin, h, w = x2.shape
        oh, ow = (1, *out_size) if rank == 1 else out_size
        co = w4.shape[0] // groups
        y = torch.empty(n, co * groups, oh, ow, dtype=x.dtype, device=x.device)
        rows = n * oh * ow
        grid = (triton.cdiv(rows, tiles.block_m), triton.cdiv(co, tiles.block_n), groups)
        nt = grid[1] * groups
        sq = torch.empty(rows, nt, dtype=torch.float32, device=x.device)
        ys = torch.empty(rows, nt, dtype=torch.float32, device=x.device)
        _launch("mc_fwd", grid, tiles, x2, w4, bias if bias is not None else w4, taps, scale, sqw, y, sq, ys, n, h,
                w, oh, ow, cin // groups, co, taps.shape[0], nt, *x2.stride(), *w4.stride(), *y.stride(),
                **_geom(stride, dilation), HAS_BIAS=bias is not None, PREC=loader.dot_precision(x.dtype))  # fmt: skip
        ctx.save_for_backward(x, weight, taps, scale)
        ctx.meta = (stride, dilation, groups, bias is not None, tiles)
        sq, ys = sq.sum(1), ys.sum(1)
        ctx.mark_non_differentiable(sq, ys)
        return (y.squeeze(2) if rank == 1 else y), sq, ys

    @staticmethod
    def backward(ctx, dy, _sq, _ys):
        x, weight, taps, scale = ctx.saved_tensors
        stride, dilation, groups, has_bias, tiles = ctx.meta
        rank = x.dim() - 2
        x2, w4, dy2 = _as2d(x), _as2d(weight), _as2d(dy.contiguous())
        n, cin, h, w = x2.shape
        oh, ow = dy2.shape[2:]
        ci, co = cin // groups, w4.shape[0] // groups
        ns = taps.shape[0]
        geo = {**_geom(stride, dilation), "PREC": loader.dot_precision(x.dtype)}
        dx = torch.empty_like(x2)
        grid = (triton.cdiv(n * h * w, tiles.block_m), triton.cdiv(ci, tiles.block_n), groups)
        _launch("mc_dgrad", grid, tiles, dy2, w4, taps, scale, dx, n, h, w, oh, ow, ci, co, ns, *dy2.stride(),
                *w4.stride(), *dx.stride(), **geo)  # fmt: skip
        dw = torch.zeros(w4.shape, dtype=torch.float32, device=x.device)
        rows = n * oh * ow
        tile_progs = triton.cdiv(co, tiles.block_m) * triton.cdiv(ci, tiles.block_n) * groups * ns
        # Split the reduction over rows until the grid fills the device (one chunk on the CPU interpreter).
        split = 1 if x.device.type != "cuda" else max(1, min(triton.cdiv(rows, 8 * tiles.block_k), 512 // tile_progs))
        chunk = triton.cdiv(triton.cdiv(rows, split), tiles.block_k) * tiles.block_k
        split = triton.cdiv(rows, chunk)
        grid = (triton.cdiv(co, tiles.block_m), triton.cdiv(ci, tiles.block_n), groups * ns * split)
        _launch("mc_wgrad", grid, tiles, x2, dy2, taps, scale, dw, n, h, w, oh, ow, ci, co, ns, split, chunk,
                *x2.stride(), *dy2.stride(), *dw.stride(), **geo)  # fmt: skip
        db = dy2.sum((0, 2, 3)).to(dy.dtype) if has_bias else None
        dx = dx.squeeze(2) if rank == 1 else dx
        return dx, dw.view(weight.shape).to(weight.dtype), db, None, None, None, None, None, None, None, None


def conv_montecarlo(x, weight, bias=None, *, layer="", return_error=False, **kw):
    """The torch lowering's shared-mode estimate and error estimate, computed by the sampled-taps kernels."""
    geometry, options = split_geometry(kw)
    semantic, tile_opts = _split(options, {f.name for f in fields(MonteCarloOptions)})
    opts = MonteCarloOptions.make(layer, **semantic)
    dc = direct_of(x, weight, geometry, layer)
    taps = tap_list(dc)
    m = opts.samples
    # The torch lowering's draw, step by step: one generator, proposal scores (constants: the estimate divides by
    # float(q)), multinomial with replacement, counts per tap.
    gen = torch.Generator(device=dc.x.device).manual_seed(int(opts.seed))
    with torch.no_grad():
        scores = None if opts.proposal == "uniform" else _tap_scores(dc, opts, False, layer, weight)
        q = _proposal(scores, len(taps), float(opts.defensive), torch.empty((len(taps),), device=dc.x.device))
    draws = torch.multinomial(q, m, replacement=True, generator=gen)
    counts = torch.bincount(draws, minlength=len(taps)).to(q.dtype)
    drawn = torch.nonzero(counts).flatten()
    c, qd = counts[drawn], q[drawn]
    tap_idx = torch.tensor(taps, dtype=torch.int32, device=dc.x.device)[drawn]
    tap2d = torch.cat([torch.zeros_like(tap_idx), tap_idx], 1) if tap_idx.shape[1] == 1 else tap_idx
    tiles = McTiles.default(x.device)
    if tile_opts:
        tiles = McTiles(**{**tiles.__dict__, **{k: int(v) for k, v in tile_opts.items()}})
    y, sumsq, ysq = _SampledTaps.apply(
        dc.x, dc.weight, bias, tap2d.contiguous(), (c / (m * qd)).float(), (c / qd.pow(2)).float(), dc.stride,
        dc.dilation, dc.groups, dc.out_size, tiles,
    )  # fmt: skip
    var = (sumsq.double() - m * ysq.double()).clamp_min(0.0) / (m * (m - 1))
    err = math.sqrt(float(var.sum()))
    est = ErrorEstimate(abs=err, rel=relative(err, y.detach()), samples=m)
    report_error(layer, est)
    return (y, est) if return_error else y
