"""Triton lowering ``lowrank`` of ``dot_exp``: FAVOR+ features and the (causal) prefix sums, forward and backward,
rendered from ``templates.LOWRANK``; the same contract and the same answer as the torch lowering
(``backends/torch/lowrank.py``) for the same options.

- Features (``favor``): one pass over q gives φ = exp(log φ - max_r log φ) and its row maxima; k takes two passes
  (the maximum of log ψ over the whole (b, h), as the torch lowering stabilises it, then ψ). ``nystrom`` and
  ``learned`` factors come from torch (autograd through them there) and feed the same prefix-sum kernels.
- Prefix sums: non-causal, the states Σ ψ vᵀ and Σ ψ are summed over column chunks in parallel, then one kernel
  contracts each row tile and normalises. Causal, one program per (b·h, slice of d) scans the chunks with the
  running state in registers and stores the state entering each chunk; the output kernel adds the diagonal chunk,
  exactly (exp(logits + log_scale), ``local=1``) or factorised (``local=0``).
- Backward: a reverse-time scan of Σ φᵀ dn (the states the later rows send back), then one kernel per row tile (dφ,
  dq) and one per column tile (dψ, dv, dk); the feature map's backward is one more kernel. The stabilisers are
  constants: the output does not depend on them, so their gradient is zero (torch's autograd gets the same by
  cancellation).

GQA/MQA keys and values are expanded to the query heads in torch (their gradients are summed there). Masks must not
vary over query rows (the torch lowering refuses those as not low rank). Tile sizes are ``LowRankTiles``; the
lowering's own options (method, rank, seed, chunk, local, ...) change the answer and are the torch ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton

from ..torch.lowrank import OPTIONS as LOWRANK_OPTIONS
from ..torch.lowrank import LowRankOptions, learned_features
from ..torch.pairkernel import DotExpKernel, expand_kv, orthogonal_gaussian
from . import loader
from .attention import INDEX_LIMIT, layout_reason
from .templates import lowrank as templates

TUNING = ("block_m", "block_n", "block_d", "split", "num_warps")
OPTIONS = (*LOWRANK_OPTIONS, *TUNING)


@dataclass(frozen=True)
class LowRankTiles:
    block_m: int = 64  # rows per program (output, dφ)
    block_n: int = 64  # columns per program (dψ, dv) and per step of the loops
    block_d: int = 64  # value dims per program of the state scans
    split: int = 1024  # non-causal: columns per program of the state sums
    num_warps: int = 4

    @staticmethod
    def default(device: torch.device) -> LowRankTiles:
        if device.type != "cuda":  # interpreter: small tiles keep numpy fast
            return LowRankTiles(16, 16, 64, 64, 1)
        return LowRankTiles(64, 32, 32, 1024, 4)  # not yet measured on a card: conservative register use

    def with_overrides(self, **kw: int) -> LowRankTiles:
        return replace(self, **{k: int(v) for k, v in kw.items() if v is not None})


def kernels():
    holes = {
        "TITLE": "dot_exp lowrank (features, prefix sums, backward)",
        "FEATURES": templates.DOT_EXP_FEATURES,
        "KERNEL": templates.DOT_EXP_LOG_KERNEL,
    }
    return loader.load("dot_exp_lowrank", loader.render(templates.LOWRANK, holes))


def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[B, H, L, X] -> contiguous [B·H, L, X]."""
    return t.reshape(-1, t.shape[-2], t.shape[-1]).contiguous()


# ---------------------------------------------------------------------------------------------- features


class _Features(torch.autograd.Function):
    """FAVOR+ features of x [B, H, L, D] (√scale inside), stabilised as the torch lowering does: per row (φ) or by one
    maximum per (b, h) (ψ). Returns the features and the stabiliser [B, H, L] (per row) or [B, H] (per b, h)."""

    @staticmethod
    def forward(ctx, x, omega, cb, root: float, per_row: bool, tiles: LowRankTiles):
        b, h, n, dqk = x.shape
        r = omega.shape[0]
        xf = _flat(x)
        bh = xf.shape[0]
        mod = kernels()
        out = torch.empty(bh, n, r, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(n, tiles.block_m), bh)
        cbf = cb.reshape(bh, n).float().contiguous() if cb is not None else out
        common = dict(PREC=loader.dot_precision(x.dtype), BLOCK_M=tiles.block_m, BLOCK_R=_p2(r), BLOCK_DQ=_p2(dqk),
                      num_warps=tiles.num_warps)  # fmt: skip
        args = (n, r, dqk, grid[0], root, 0.5 * math.log(r))
        if per_row:
            stab = torch.empty(bh, n, dtype=torch.float32, device=x.device)
            mod.features_fwd[grid](xf, omega, cbf, stab, out, stab, *args, HAS_CB=cb is not None, MODE=0, **common)
        else:
            tile_max = torch.empty(bh, grid[0], dtype=torch.float32, device=x.device)
            mod.features_fwd[grid](xf, omega, cbf, tile_max, out, tile_max, *args, HAS_CB=cb is not None, MODE=1,
                                   **common)  # fmt: skip
            stab = tile_max.amax(1)
            stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))
            mod.features_fwd[grid](xf, omega, cbf, stab, out, tile_max, *args, HAS_CB=cb is not None, MODE=2,
                                   **common)  # fmt: skip
        ctx.save_for_backward(x, omega, out)
        ctx.meta = (root, tiles)
        ctx.mark_non_differentiable(stab)
        lead = (b, h, n) if per_row else (b, h)
        return out.view(b, h, n, r), stab.view(lead)

    @staticmethod
    def backward(ctx, dout, _dstab):
        x, omega, out = ctx.saved_tensors
        root, tiles = ctx.meta
        b, h, n, dqk = x.shape
        r = omega.shape[0]
        xf = _flat(x)
        dx = torch.empty_like(xf)
        grid = (triton.cdiv(n, tiles.block_m), xf.shape[0])
        kernels().features_bwd[grid](
            xf, omega, out, _flat(dout).float(), dx, n, r, dqk, root,
            PREC=loader.dot_precision(x.dtype), BLOCK_M=tiles.block_m, BLOCK_R=_p2(r), BLOCK_DQ=_p2(dqk),
            num_warps=tiles.num_warps,
        )  # fmt: skip
        return dx.view(x.shape), None, None, None, None, None


# ---------------------------------------------------------------------------------------------- prefix sums


def _states(mod, a, bmat, wb, wz, la: int, nc: int, ch: int, causal: bool, reverse: bool, tiles, prec: str):
    """HS [BH, NC, R, D], ZS [BH, NC, R]: per chunk, the sums over the chunks before it (causal, reverse: after it),
    or the total (non-causal, NC = 1)."""
    bh, _, r = a.shape
    d = bmat.shape[-1]
    bd = min(_p2(d), tiles.block_d)
    common = dict(HAS_W=wb is not None, PREC=prec, BLOCK_N=tiles.block_n, BLOCK_R=_p2(r), BLOCK_D=bd,
                  num_warps=tiles.num_warps)  # fmt: skip
    wb = wb if wb is not None else a
    wz = wz if wz is not None else a
    if causal:
        hs = torch.empty(bh, nc, r, d, dtype=torch.float32, device=a.device)
        zs = torch.empty(bh, nc, r, dtype=torch.float32, device=a.device)
        grid = (bh, triton.cdiv(d, bd))
        mod.state_scan[grid](a, bmat, wb, wz, hs, zs, la, nc, r, d, ch, REVERSE=reverse, **common)
        return hs, zs
    parts = max(1, triton.cdiv(la, tiles.split))
    hs = torch.empty(bh, parts, r, d, dtype=torch.float32, device=a.device)
    zs = torch.empty(bh, parts, r, dtype=torch.float32, device=a.device)
    mod.state_chunks[(parts, bh, triton.cdiv(d, bd))](a, bmat, wb, wz, hs, zs, la, parts, r, d, tiles.split, **common)
    return hs.sum(1, keepdim=True), zs.sum(1, keepdim=True)


class _PrefixSum(torch.autograd.Function):
    """y = the lowrank transform of (φ, ψ, v), all [B, H, ·, ·]; with ``local`` the diagonal chunks use the exact
    kernel exp(scale·qkᵀ + cb + ls) instead (q, k, cb [B, H, LK], ls [B, H, LQ])."""

    @staticmethod
    def forward(ctx, phi, psi, v, q, k, cb, ls, scale: float, causal: bool, local: bool, chunk: int, tiles):
        b, h, lq, r = phi.shape
        lk, d = v.shape[-2], v.shape[-1]
        dqk = q.shape[-1]
        bh = b * h
        mod = kernels()
        prec = loader.dot_precision(v.dtype)
        phif, psif, vf = _flat(phi), _flat(psi), _flat(v)
        qf, kf = (_flat(q), _flat(k)) if local else (phif, psif)
        cbf = cb.reshape(bh, lk).float().contiguous() if local and cb is not None else None
        if local and cbf is None:
            cbf = torch.zeros(bh, lk, dtype=torch.float32, device=v.device)
        lsf = ls.reshape(bh, lq).float().contiguous() if local else None
        ch = chunk if causal else max(lq, lk, 1)
        nc = triton.cdiv(lq, ch) if causal else 1
        hs, zs = _states(mod, psif, vf, None, None, lk, nc, ch, causal, False, tiles, prec)
        out = torch.empty(bh, lq, d, dtype=v.dtype, device=v.device)
        den = torch.empty(bh, lq, dtype=torch.float32, device=v.device)
        dummy = den
        mod.lowrank_fwd[(triton.cdiv(lq, tiles.block_m), bh)](
            phif, psif, vf, qf, kf, cbf if local else dummy, lsf if local else dummy, hs, zs, out, den,
            lq, lk, r, d, dqk, ch, nc, scale,
            CAUSAL=causal, LOCAL=local, PREC=prec, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_R=_p2(r),
            BLOCK_D=_p2(d), BLOCK_DQ=_p2(dqk), num_warps=tiles.num_warps,
        )  # fmt: skip
        ctx.save_for_backward(
            phif, psif, vf, qf, kf, cbf if local else dummy, lsf if local else dummy, hs, zs, out, den
        )
        ctx.meta = (b, h, scale, causal, local, ch, nc, tiles, q.shape, k.shape, ls is not None and local)
        return out.view(b, h, lq, d)

    @staticmethod
    def backward(ctx, dy):
        phif, psif, vf, qf, kf, cbf, lsf, hs, zs, out, den = ctx.saved_tensors
        b, h, scale, causal, local, ch, nc, tiles, qshape, kshape, has_ls = ctx.meta
        bh, lq, r = phif.shape
        lk, d = vf.shape[-2], vf.shape[-1]
        dqk = qshape[-1]
        mod = kernels()
        prec = loader.dot_precision(vf.dtype)
        g = _flat(dy)
        rden = 1.0 / den
        dd = -(g.float() * out.float()).sum(-1) * rden
        gs, gz = _states(mod, phif, g, rden, dd, lq, nc, ch, causal, True, tiles, prec)
        dphi = torch.empty(bh, lq, r, dtype=phif.dtype, device=phif.device)
        dpsi = torch.empty(bh, lk, r, dtype=psif.dtype, device=psif.device)
        dv = torch.empty_like(vf)
        dq = torch.empty(qf.shape, dtype=qf.dtype, device=qf.device) if local else den
        dk = torch.empty(kf.shape, dtype=kf.dtype, device=kf.device) if local else den
        dls = torch.empty(bh, lq, dtype=torch.float32, device=den.device) if local else den
        common = dict(CAUSAL=causal, LOCAL=local, PREC=prec, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                      BLOCK_R=_p2(r), BLOCK_D=_p2(d), BLOCK_DQ=_p2(dqk), num_warps=tiles.num_warps)  # fmt: skip
        sizes = (lq, lk, r, d, dqk, ch, nc, scale)
        mod.lowrank_bwd_rows[(triton.cdiv(lq, tiles.block_m), bh)](
            phif, psif, vf, qf, kf, cbf, lsf, hs, zs, g, rden, dd, dphi, dq, dls, *sizes, **common
        )
        mod.lowrank_bwd_cols[(triton.cdiv(lk, tiles.block_n), bh)](
            phif, psif, vf, qf, kf, cbf, lsf, gs, gz, g, rden, dd, dpsi, dv, dk, *sizes, **common
        )
        grads = [dphi.view(b, h, lq, r), dpsi.view(b, h, lk, r), dv.view(b, h, lk, d)]
        if local:
            grads += [dq.view(qshape), dk.view(kshape), None, dls.view(b, h, lq) if has_ls else None]
        else:
            grads += [None, None, None, None]
        return (*grads, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------- the lowering


def supported(q, k, v, mask=None, *, rank: int = LowRankOptions.rank, return_weights=False, **_: object) -> str | None:
    """Why the kernels cannot take these inputs, or None when they can."""
    if return_weights:
        return "the layer returns its attention weights"
    reason = layout_reason(q, k, v)
    if reason is not None:
        return reason
    if max(q.shape[2], k.shape[2]) * max(q.shape[-1], v.shape[-1], rank) >= INDEX_LIMIT:
        return "a (batch, head) slice of 2³¹ elements or more (the kernels index inside one with 32-bit offsets)"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}"
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        return "q, k and v differ in dtype"
    if max(q.shape[-1], v.shape[-1]) > 256:
        return "head dim above 256"
    if rank > 256:
        return "rank above 256"
    if mask is not None and mask.requires_grad:
        return "the additive mask needs a gradient"
    if mask is not None and mask.dim() >= 2 and mask.shape[-2] != 1:
        return "the mask varies across query rows (not low rank)"
    return None


def attention_lowrank(q, k, v, mask=None, *, scale, causal, return_weights=False, layer="", **options):
    """The Triton implementation of the ``dot_exp`` lowrank lowering, with the torch lowering's contract."""
    tiles = LowRankTiles.default(q.device).with_overrides(**{t: options.pop(t) for t in TUNING if t in options})
    opts = LowRankOptions.make(layer, **options)
    kernel = DotExpKernel(q, k, mask, scale=scale, causal=causal, layer=layer)
    cb = kernel.column_bias()  # [B, H, LK] or None (``supported`` sends row-varying masks to torch)
    k_e, v_e = expand_kv(q, k), expand_kv(q, v)
    if opts.method == "favor":
        gen = torch.Generator().manual_seed(opts.seed)
        omega = orthogonal_gaussian(opts.rank, q.shape[-1], gen, q.dtype).to(q.device).contiguous()
        root = math.sqrt(scale)
        phi, rmax = _Features.apply(q, omega, None, root, True, tiles)
        psi, kmax = _Features.apply(k_e, omega, cb, root, False, tiles)
        ls = -(rmax + kmax[..., None])
    elif opts.method == "nystrom":
        f = kernel.nystrom(opts.rank, opts.landmarks, opts.seed)
        phi, psi, ls = f.phi, f.psi, f.log_scale
    else:
        f = learned_features(q, k, v, scale=scale, causal=causal, opts=opts, layer=layer).features(kernel)
        phi, psi, ls = f.phi, f.psi, f.log_scale
    local = bool(causal and opts.local and ls is not None)
    dtype = v.dtype
    phi, psi = phi.to(dtype), psi.to(dtype)
    return _PrefixSum.apply(phi, psi, v_e, q, k_e, cb, ls, scale, causal, local, opts.chunk, tiles)


def flops(b: int, h: int, lq: int, lk: int, d: int, r: int, causal: bool, chunk: int, local: bool) -> float:
    """Forward: features (2·L·r·d each for φ, ψ), states (2·LK·r·d), contraction (2·LQ·r·d), and the diagonal chunks
    (about 2·LQ·chunk·(d + d)/2 exact or factorised) when causal."""
    f = 2.0 * b * h * (lq + lk) * r * d + 2.0 * b * h * lk * r * d + 2.0 * b * h * lq * r * d
    if causal:
        f += 2.0 * b * h * lq * chunk * ((d if local else r) + d) / 2
    return f
