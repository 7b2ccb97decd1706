"""Triton lowering of ``wkv`` (RWKV's WKV, layouts in ``ir/wkv.py``): a forward scan and a backward by recomputation
and a reverse-time scan, rendered from ``templates.WKV_SCAN``.

One program per (batch, block of channels) keeps the (numerator, denominator, maximum) state in registers and walks
the sequence, with the same stabilisation as the torch ``scan`` lowering. The forward stores nothing for training
(only the output); the backward recomputes the forward once, keeping y and ln D per step (float32, B·L·C each) for
its reverse walk, and writes per-batch partial gradients of w and u, which the caller sums.
"""

from __future__ import annotations

import torch
import triton

from . import loader
from .templates import WKV_SCAN

MAX_BLOCK_C = 64  # channels per program


def kernels():
    return loader.load("wkv_scan", loader.render(WKV_SCAN, {"TITLE": "wkv scan (RWKV)"}))


def _launch(k: torch.Tensor) -> tuple[tuple[int, int], dict[str, object]]:
    bsz, _, c = k.shape
    block = min(MAX_BLOCK_C, max(2, triton.next_power_of_2(c)))
    flags = {"F64": k.dtype == torch.float64, "BLOCK_C": block}
    if k.is_cuda:
        flags["num_warps"] = 1
    return (bsz, triton.cdiv(c, block)), flags


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, w, u):
        bsz, length, c = k.shape
        w, u = w.contiguous(), u.contiguous()
        y = torch.empty(bsz, length, c, dtype=k.dtype, device=k.device)
        grid, flags = _launch(k)
        kernels().wkv_fwd[grid](k, v, w, u, y, length, c, *k.stride(), *v.stride(), **flags)
        ctx.save_for_backward(k, v, w, u)
        return y

    @staticmethod
    def backward(ctx, gy):
        k, v, w, u = ctx.saved_tensors
        bsz, length, c = k.shape
        acc = torch.promote_types(k.dtype, torch.float32)
        f = dict(dtype=acc, device=k.device)
        ys, ld, gk, gv = (torch.empty(bsz, length, c, **f) for _ in range(4))
        ga, gu = torch.empty(bsz, c, **f), torch.empty(bsz, c, **f)
        grid, flags = _launch(k)
        kernels().wkv_bwd[grid](
            k, v, w, u, gy.contiguous(), ys, ld, gk, gv, ga, gu, length, c, *k.stride(), *v.stride(), **flags
        )
        return gk.to(k.dtype), gv.to(v.dtype), (-ga.sum(0)).to(w.dtype), gu.sum(0).to(u.dtype)


def supported(k, v, w, u, **_: object) -> str | None:
    if k.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return f"dtype {k.dtype}"
    if v.shape != k.shape or k.dim() != 3:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} are not both [batch, length, channels]"
    if k.numel() >= 2**31:
        return "B·L·C passes 2³¹ elements, beyond the kernel's 32-bit offsets"
    return None


def wkv_scan(k, v, w, u, **_: object):
    """Same contract as the torch ``wkv`` lowerings."""
    if k.shape[1] == 0:
        return k.new_empty(k.shape)
    return _Scan.apply(k, v, w, u)
