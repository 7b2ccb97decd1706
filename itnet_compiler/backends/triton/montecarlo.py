"""Triton lowering of ``dot_exp`` by Monte Carlo: the torch lowering's samples, estimated by a gather-reduce kernel.

Sampling stays in torch (``backends/torch/montecarlo.draw``: the same proposals, generator and blocks of rows), so
for one seed both backends take the same columns and agree to rounding. The kernels of
``templates.montecarlo.MONTECARLO`` then compute, per row, the self-normalised estimate and its delta-method
variance (reported as the layer's ``ErrorEstimate``); rows with no usable sample are computed exactly in torch, as
the torch lowering does. Backward (``_MonteCarlo``): dQ per row by recomputation, dK/dV by atomic scatter-adds into
float32 buffers (sampled columns repeat; GQA groups land on their shared K/V head), and the gradient of log q for a
data-dependent proposal, which torch autograd carries on to k and v exactly as through the torch lowering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import triton

from ...errors import ItnetError
from ..torch.montecarlo import MonteCarloOptions, _exact_rows, check_rows, draw, estimate_error
from ..torch.pairkernel import DotExpKernel, expand_kv
from ..torch.runtime import report_error
from . import loader
from .attention import INDEX_LIMIT, layout_reason, operand_reason
from .templates.montecarlo import DOT_EXP_SAMPLED, MONTECARLO


@dataclass(frozen=True)
class MonteCarloTiles:
    """Tile sizes (constexpr): samples per chunk, rows per program (per_row: block_r, shared: block_m), warps."""

    block_s: int = 32
    block_r: int = 4
    block_m: int = 64
    num_warps: int = 4

    @staticmethod
    def default(d: int, device: torch.device) -> MonteCarloTiles:
        """Per-row tiles hold BLOCK_R·BLOCK_S gathered rows of K and of V in registers, so they shrink with d."""
        if device.type != "cuda":  # interpreter: few, large programs keep numpy fast
            return MonteCarloTiles(block_s=16, block_r=16, block_m=16, num_warps=1)
        if d <= 64:
            return MonteCarloTiles(block_s=32, block_r=4, block_m=64, num_warps=4)
        return MonteCarloTiles(block_s=16, block_r=4, block_m=32, num_warps=4)


TILE_OPTIONS = frozenset(f.name for f in fields(MonteCarloTiles))


def kernels():
    """The rendered module for the dot_exp family (per-row and shared, forward and backward)."""
    holes = {"TITLE": "dot_exp montecarlo gather-reduce", "KERNEL": DOT_EXP_SAMPLED}
    return loader.load("dot_exp_montecarlo", loader.render(MONTECARLO, holes))


def _bias(mask: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, tuple]:
    """The mask as an additive bias broadcast to [B, H, LQ, LK] through strides (bool: 0 / -inf); a 1-element
    placeholder when there is none."""
    if mask is None:
        return torch.empty(1, device=device, dtype=torch.float32), (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(shape)
    return mask, tuple(mask.stride())


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _samples(kernel: DotExpKernel, v: torch.Tensor, opts: MonteCarloOptions):
    """All rows' samples at once: idx int32 and logq ([B, H, LQ, M] per row; [B, H, M] shared)."""
    blocks = list(draw(kernel, v, opts))
    if opts.mode == "shared":
        _, _, idx, logq = blocks[0]
        return idx.to(torch.int32).contiguous(), logq[..., 0, :]
    idx = torch.cat([b[2] for b in blocks], -2).to(torch.int32).contiguous()
    return idx, torch.cat([b[3] for b in blocks], -2)


def forward(q, k, v, idx, logq, bias, bs, scale: float, causal: bool, shared: bool, tiles: MonteCarloTiles):
    b, h, lq, d = q.shape
    group = h // k.shape[1]
    y = torch.empty(b, h, lq, d, dtype=v.dtype, device=q.device)
    lse = torch.empty(b * h, lq, dtype=torch.float32, device=q.device)
    var = torch.empty(b * h, lq, dtype=torch.float32, device=q.device)
    m = idx.shape[-1]
    mod = kernels()
    strides = (*q.stride(), *k.stride(), *v.stride(), *idx.stride(), *logq.stride(), *bs, *y.stride())
    if shared:
        grid = (triton.cdiv(lq, tiles.block_m), b * h)
        mod.mc_fwd_shared[grid](
            q, k, v, idx, logq, bias, y, lse, var, *strides, h, group, lq, m, d, scale,
            HAS_BIAS=bias.dim() == 4, CAUSAL=causal, PREC=loader.dot_precision(q.dtype),
            BLOCK_M=tiles.block_m, BLOCK_S=tiles.block_s, BLOCK_D=_block_d(d), num_warps=tiles.num_warps,
        )  # fmt: skip
    else:
        mod.mc_fwd_rows[(triton.cdiv(lq, tiles.block_r), b * h)](
            q, k, v, idx, logq, bias, y, lse, var, *strides, h, group, lq, m, d, scale,
            HAS_BIAS=bias.dim() == 4, BLOCK_R=tiles.block_r, BLOCK_S=tiles.block_s, BLOCK_D=_block_d(d),
            num_warps=tiles.num_warps,
        )  # fmt: skip
    return y, lse, var


def backward(dy, q, k, v, idx, logq, bias, bs, y, lse, scale, causal, shared, want_dlq, tiles: MonteCarloTiles):
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    m = idx.shape[-1]
    q, dy = q.contiguous(), dy.contiguous()  # DQ is written with Q's strides
    delta = (dy.float() * y.float()).sum(-1).reshape(b * h, lq)
    dq = torch.empty_like(q)
    dk = torch.zeros(b, hkv, lk, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros(b, hkv, lk, d, dtype=torch.float32, device=q.device)
    dlq = torch.zeros(logq.shape if want_dlq else (1,), dtype=torch.float32, device=q.device)
    mod = kernels()
    args = (q, k, v, idx, logq, bias, dy, lse, delta, dq, dk, dv, dlq, *q.stride(), *k.stride(), *v.stride(),
            *idx.stride(), *logq.stride(), *bs, *dy.stride(), *dk.stride(),
            h, hkv, h // hkv, lq, lk, m, d, scale)  # fmt: skip
    if shared:
        mod.mc_bwd_shared[(triton.cdiv(lq, tiles.block_m), b * h)](
            *args, HAS_BIAS=bias.dim() == 4, CAUSAL=causal, PREC=loader.dot_precision(q.dtype), HAS_DLQ=want_dlq,
            BLOCK_M=tiles.block_m, BLOCK_S=tiles.block_s, BLOCK_D=_block_d(d), num_warps=tiles.num_warps,
        )  # fmt: skip
    else:
        mod.mc_bwd_rows[(triton.cdiv(lq, tiles.block_r), b * h)](
            *args, HAS_BIAS=bias.dim() == 4, HAS_DLQ=want_dlq, BLOCK_R=tiles.block_r, BLOCK_S=tiles.block_s,
            BLOCK_D=_block_d(d), num_warps=tiles.num_warps,
        )  # fmt: skip
    return dq, dk.to(k.dtype), dv.to(v.dtype), (dlq.to(logq.dtype) if want_dlq else None)


class _MonteCarlo(torch.autograd.Function):
    """(q, k, v, logq) -> (y, lse, var); idx and the mask are constants, lse and var carry no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, logq, idx, bias, bs, scale, causal, shared, tiles):
        y, lse, var = forward(q, k, v, idx, logq, bias, bs, scale, causal, shared, tiles)
        ctx.save_for_backward(q, k, v, logq, idx, bias, y, lse)
        ctx.meta = (bs, scale, causal, shared, tiles)
        ctx.mark_non_differentiable(lse, var)
        return y, lse, var

    @staticmethod
    def backward(ctx, dy, _dlse, _dvar):
        q, k, v, logq, idx, bias, y, lse = ctx.saved_tensors
        bs, scale, causal, shared, tiles = ctx.meta
        dq, dk, dv, dlq = backward(
            dy, q, k, v, idx, logq, bias, bs, y, lse, scale, causal, shared, ctx.needs_input_grad[3], tiles
        )
        return dq, dk, dv, dlq, None, None, None, None, None, None, None


def _slice_extent(t: torch.Tensor) -> int:
    """Elements one slice of the last two dims spans through its strides (a bool mask becomes a contiguous bias)."""
    if t.dtype == torch.bool:
        return math.prod(t.shape[-2:])
    return 1 + sum(max(n - 1, 0) * abs(st) for n, st in zip(t.shape[-2:], t.stride()[-2:], strict=True))


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> str | None:
    """Why the kernels cannot take these inputs, or None when they can."""
    reason = layout_reason(q, k, v)
    if reason is not None:
        return reason
    slices = [_slice_extent(t) for t in (q, k, v) + ((mask,) if mask is not None else ())]
    if max(*slices, max(q.shape[2], k.shape[2]) * q.shape[-1]) >= INDEX_LIMIT:
        return "a (batch, head) slice of 2³¹ elements or more (the kernels index inside one with 32-bit offsets)"
    reason = operand_reason(q, v, mask)
    if reason is not None:
        return reason
    if not (q.dtype == k.dtype == v.dtype):
        return "query, key and value dtypes differ"
    return None


def montecarlo_attention(
    q, k, v, mask=None, *, scale, causal, return_weights=False, layer="", return_error=False, **options
):
    """The Triton implementation of ``dot_exp`` by Monte Carlo, with the torch lowering's contract and samples.

    ``options`` are the lowering's (``MonteCarloOptions``) plus the tile sizes of ``MonteCarloTiles``."""
    if return_weights:
        raise ItnetError("the montecarlo lowering cannot return attention weights; use dense", layer=layer or None)
    tiles = MonteCarloTiles.default(q.shape[-1], q.device)
    tiles = replace(tiles, **{key: int(val) for key, val in options.items() if key in TILE_OPTIONS})
    opts = MonteCarloOptions.make(layer, **{key: val for key, val in options.items() if key not in TILE_OPTIONS})
    kernel = DotExpKernel(q, k, mask, scale=scale, causal=causal, layer=layer)
    idx, logq = _samples(kernel, expand_kv(q, v), opts)
    b, h, lq, _ = q.shape
    bias, bs = _bias(mask, (b, h, lq, k.shape[2]), q.device)
    y, lse, var = _MonteCarlo.apply(
        q, k, v, logq, idx, bias, bs, float(scale), bool(causal), opts.mode == "shared", tiles
    )
    bad = torch.isinf(lse).reshape(b, h, lq)
    fallback = int(bad.sum())
    if fallback:
        y = _exact_rows(kernel, expand_kv(q, v), y, bad, 0)
    est = estimate_error(var.double().sum(), y, opts.samples, fallback, check_rows(kernel, expand_kv(q, v), y, opts))
    report_error(layer, est)
    return (y, est) if return_error else y
