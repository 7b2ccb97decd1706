"""Triton lowering of ``dot_exp`` by ``hybrid``: the torch lowering's selection, computed by one kernel per direction.

The selection (probes, check rows, kept blocks, samples) is ``backends/torch/hybrid.select``: the same generator, so
for one seed both backends take the same blocks and columns and agree to rounding. ``templates.hybrid`` then runs,
per (query block, batch·head), the kept key blocks with the online softmax and the sampled columns with their
log-weights in the same running sums; the backward recomputes p per tile and adds dK, dV atomically into float32
buffers. The error estimate (sampling variance of the sample slots, the check rows' measured error) is computed in
torch from the kernel's output, as the torch lowering computes it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import triton

from ...errors import ItnetError
from ...ir.lowerings.options import HybridOptions
from ..torch.hybrid import Chunk, Problem, Tally, sampling_variance, select
from ..torch.runtime import report_error
from . import loader
from .attention import GRID_Y, INDEX_LIMIT, LOG2E
from .templates.hybrid import HYBRID


@dataclass(frozen=True)
class HybridTiles:
    """Samples per chunk of the sample loop, and warps (the query block is the lowering's ``block``)."""

    block_s: int = 32
    num_warps: int = 4
    num_stages: int = 2

    @staticmethod
    def default(device: torch.device, block: int = 64, d: int = 64, dtype=torch.bfloat16) -> HybridTiles:
        """Query tiles of ``block`` rows with [block, d] float32 accumulators: wide tiles (block 128, or fp32 with
        d 128) take 8 warps and one stage to stay in registers and shared memory (``bench/compile_sm90.py``)."""
        if device.type != "cuda":
            return HybridTiles(block_s=16, num_warps=1, num_stages=1)
        wide = block * max(d, 64) * (2 if dtype == torch.float32 else 1) > 64 * 128
        return HybridTiles(block_s=32 if not wide else 16, num_warps=8 if wide else 4, num_stages=1 if wide else 2)


TILE_OPTIONS = frozenset(f.name for f in fields(HybridTiles))


def kernels():
    return loader.load("dot_exp_hybrid", loader.render(HYBRID, {"TITLE": "dot_exp hybrid (kept blocks + samples)"}))


def tables(chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KEPT [BH, nQ, KMAX] int32 (-1 unused), IDX [BH, nQ, M] int32, LOGW [BH, nQ, M] float32."""
    kmax = max(c.kept.shape[-1] for c in chunks)
    kept = [torch.nn.functional.pad(torch.where(c.ok, c.kept, -1), (0, kmax - c.kept.shape[-1]), value=-1)
            for c in chunks]  # fmt: skip
    return (
        torch.cat(kept, 1).to(torch.int32).contiguous(),
        torch.cat([c.idx for c in chunks], 1).to(torch.int32).contiguous(),
        torch.cat([c.logw for c in chunks], 1).float().contiguous(),
    )


class _Hybrid(torch.autograd.Function):
    """(q, k, v, v̄) padded [BH, L, D] -> (o [BH, LQ_pad, D], lse); the tables are constants."""

    @staticmethod
    def forward(ctx, q, k, v, vbar, kept, idx, logw, meta):
        lk, scale, causal, pooled, bs, tiles = meta
        bh, lq_pad, d = q.shape
        o = torch.empty_like(q)
        lse = torch.empty(bh, lq_pad, dtype=torch.float32, device=q.device)
        grid = (lq_pad // bs, bh)
        kernels().hybrid_fwd[grid](
            q, k, v, vbar, kept, idx, logw, o, lse, *q.stride(), *k.stride(), *v.stride(), *vbar.stride()[:2],
            *kept.stride(), *idx.stride(), *o.stride(), lq_pad, lk, d, kept.shape[-1], idx.shape[-1],
            scale * LOG2E, CAUSAL=causal, POOLED=pooled, PREC=loader.dot_precision(q.dtype), BS=bs,
            BLOCK_S=tiles.block_s, BLOCK_D=_block_d(d), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, vbar, kept, idx, logw, o, lse)
        ctx.meta = meta
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, vbar, kept, idx, logw, o, lse = ctx.saved_tensors
        lk, scale, causal, pooled, bs, tiles = ctx.meta
        bh, lq_pad, d = q.shape
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        dvbar = torch.zeros(vbar.shape, dtype=torch.float32, device=q.device)
        kernels().hybrid_bwd[(lq_pad // bs, bh)](
            q, k, v, vbar, kept, idx, logw, do, lse, delta, dq, dk, dv, dvbar, *q.stride(), *k.stride(),
            *v.stride(), *vbar.stride()[:2], *kept.stride(), *idx.stride(), *do.stride(), lq_pad, lk, d,
            kept.shape[-1], idx.shape[-1], scale * LOG2E, scale, CAUSAL=causal, POOLED=pooled,
            PREC=loader.dot_precision(q.dtype), BS=bs, BLOCK_S=tiles.block_s, BLOCK_D=_block_d(d),
            num_warps=tiles.num_warps, num_stages=1,
        )  # fmt: skip
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dvbar.to(vbar.dtype), None, None, None, None


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def supported(q, k, v, mask, **_: object) -> str | None:
    """Why the kernels cannot take these inputs, or None when they can."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v not [batch, heads, rows, dim]"
    if mask is not None:
        return "a mask (the hybrid kernels take none; the torch lowering does)"
    if q.shape[-1] != v.shape[-1] or q.shape[-1] > 256:
        return "value head dim differs from the query's, or above 256"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[0] * q.shape[1] > GRID_Y:
        return f"batch × heads above {GRID_Y}"
    if max(q.shape[2], k.shape[2]) * q.shape[-1] * 2 >= INDEX_LIMIT:
        return "a (batch, head) slice of 2³¹ elements or more"
    return None


def hybrid_attention(q, k, v, mask=None, *, scale, causal, return_weights=False, layer="", return_error=False,
                     **options):  # fmt: skip
    """The Triton implementation of ``dot_exp`` by ``hybrid``, with the torch lowering's contract and selection."""
    if return_weights:
        raise ItnetError("the hybrid lowering cannot return attention weights; use dense", layer=layer or None)
    tiles = HybridTiles.default(q.device, int(options.get("block", 64)), q.shape[-1], q.dtype)
    tiles = replace(tiles, **{key: int(val) for key, val in options.items() if key in TILE_OPTIONS})
    opts = HybridOptions.make(layer, **{key: val for key, val in options.items() if key not in TILE_OPTIONS})
    p = Problem(q, k, v, mask, scale=scale, causal=causal, opts=opts, layer=layer)
    chunks = list(select(p))
    kept, idx, logw = tables(chunks)
    pooled = opts.values == "pooled"
    meta = (p.lk, p.scale, bool(causal), pooled, p.bs, tiles)
    qc, kc, vc = p.q.contiguous(), p.k.contiguous(), p.v.contiguous()
    o, lse = _Hybrid.apply(qc, kc, vc, p.vbar.contiguous(), kept, idx, logw, meta)
    est = _estimate(p, chunks, o.detach(), lse, kc, vc)
    report_error(layer, est)
    out = o[:, : p.lq].reshape(*p.batch, p.lq, p.dv)
    return (out, est) if return_error else out


@torch.no_grad()
def _estimate(p: Problem, chunks: list[Chunk], o: torch.Tensor, lse: torch.Tensor, k, v):
    """The torch lowering's estimate from the kernel's output: the sample slots' weights are recomputed from lse."""
    bs, bh = p.bs, o.shape[0]
    tally = Tally()
    ob = o.view(bh, p.nq, bs, p.dv)
    lb = lse.view(bh, p.nq, bs)
    qb = p.q.view(bh, p.nq, bs, p.d)
    for c in chunks:
        y = ob[:, c.g0 : c.g1]
        flat = (c.idx + torch.arange(bh, device=p.device)[:, None, None] * k.shape[1]).flatten()
        ks = k.reshape(-1, p.d).index_select(0, flat).view(*c.idx.shape, p.d)
        if p.opts.values == "pooled":
            blk = (c.idx // bs + torch.arange(bh, device=p.device)[:, None, None] * p.nk).flatten()
            vs = p.vbar.reshape(-1, p.dv).index_select(0, blk).view(*c.idx.shape, p.dv)
        else:
            vs = v.reshape(-1, p.dv).index_select(0, flat).view(*c.idx.shape, p.dv)
        s = torch.matmul(qb[:, c.g0 : c.g1].float() * p.scale, ks.float().transpose(-2, -1)) + c.logw[:, :, None]
        w = torch.exp2(s * LOG2E - lb[:, c.g0 : c.g1, :, None]).nan_to_num(0.0).float()
        tally.var += float(sampling_variance(y.float(), w, vs.float(), c.idx.shape[-1]))
        tally.checks(c, y)
    return tally.estimate(o[:, : p.lq], p.opts.samples)
