"""Triton lowerings of ``wkv`` (RWKV's WKV, layouts in ``ir/wkv.py``): ``scan`` and ``chunked``, forward and backward.

``scan`` (``templates.WKV_SCAN``): one program per (batch, block of channels) keeps the (numerator, denominator,
maximum) state in registers and walks the sequence, with the same stabilisation as the torch ``scan`` lowering. The
forward stores nothing for training (only the output); the backward recomputes the forward once, keeping y and ln D
per step (float32, B·L·C each) for its reverse walk, and writes per-batch partial gradients of w and u, which the
caller sums.

``chunked`` (``templates.WKV_CHUNKED``): the math of the torch ``chunked`` lowering. One program per (batch, block of
channels) loops over chunks of ``chunk`` steps (a constexpr, capped at ``MAX_CHUNK`` and at the length's power of
two: the result does not depend on it); inside a chunk it forms the dense [chunk, chunk] log-weight matrix of every
channel of its block on chip, and only the stabilised (numerator, denominator, maximum) state passes between chunks.
Its own backward recomputes the state entering each chunk (float32, B·(L/chunk)·3·C: a chunk's worth less than the
scan's y and ln D), then walks the chunks in reverse, recomputing each chunk's matrix and carrying the gradients of
the state. The channels of a block are chosen so the [chunk, chunk, channels] tile holds at most ``TILE_ELEMS``
values; the torch lowering's ``budget`` (how much of those matrices torch holds in memory) has no role here.
"""

from __future__ import annotations

import torch
import triton

from . import loader
from .templates import WKV_CHUNKED, WKV_SCAN

MAX_BLOCK_C = 64  # channels per program
MAX_CHUNK = 64  # steps per chunk of the chunked kernels: a chunk's [T, T, channels] tile lives in registers
# Most elements of that tile per program, and the warps on the GPU: with these, bench/compile_sm90.py finds no spills
# on sm_90 at chunks 16-64 (4 warps spill in the backward at chunk 32 and 64; the backward holds about 4 such tiles).
TILE_ELEMS = {"fwd": 8192, "bwd": 4096}
WARPS = {"fwd": 8, "bwd": 8}


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


# ------------------------------------------------------------------------------------------------------ chunked


def chunked_kernels():
    return loader.load("wkv_chunked", loader.render(WKV_CHUNKED, {"TITLE": "wkv chunked (RWKV)"}))


def _chunk_size(chunk: int, length: int) -> int:
    return max(1, min(int(chunk), MAX_CHUNK, triton.next_power_of_2(length)))


def _chunked_launch(k: torch.Tensor, chunk: int, phase: str) -> tuple[tuple[int, int], dict[str, object]]:
    bsz, _, c = k.shape
    block_t = max(2, triton.next_power_of_2(chunk))
    block = min(MAX_BLOCK_C, triton.next_power_of_2(c), max(1, TILE_ELEMS[phase] // (block_t * block_t)))
    flags = {"F64": k.dtype == torch.float64, "CHUNK": chunk, "BLOCK_T": block_t, "BLOCK_C": block}
    if k.is_cuda:
        flags["num_warps"] = WARPS[phase]
    return (bsz, triton.cdiv(c, block)), flags


class _Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, w, u, chunk):
        bsz, length, c = k.shape
        w, u = w.contiguous(), u.contiguous()
        y = torch.empty(bsz, length, c, dtype=k.dtype, device=k.device)
        grid, flags = _chunked_launch(k, chunk, "fwd")
        chunked_kernels().wkv_chunked_fwd[grid](k, v, w, u, y, length, c, *k.stride(), *v.stride(), **flags)
        ctx.save_for_backward(k, v, w, u)
        ctx.chunk = chunk
        return y

    @staticmethod
    def backward(ctx, gy):
        k, v, w, u = ctx.saved_tensors
        bsz, length, c = k.shape
        nc = triton.cdiv(length, ctx.chunk)
        acc = torch.promote_types(k.dtype, torch.float32)
        f = dict(dtype=acc, device=k.device)
        states = torch.empty(bsz, nc, 3, c, **f)
        gk, gv = torch.empty(bsz, length, c, **f), torch.empty(bsz, length, c, **f)
        ga, gu = torch.empty(bsz, c, **f), torch.empty(bsz, c, **f)
        grid, flags = _chunked_launch(k, ctx.chunk, "bwd")
        chunked_kernels().wkv_chunked_bwd[grid](
            k, v, w, u, gy.contiguous(), states, gk, gv, ga, gu, length, c, nc, *k.stride(), *v.stride(), **flags
        )
        grads = gk.to(k.dtype), gv.to(v.dtype), (-ga.sum(0)).to(w.dtype), gu.sum(0).to(u.dtype)
        return *grads, None


def wkv_chunked(k, v, w, u, *, chunk: int = 32, **_: object):
    """Same contract as the torch ``wkv`` lowerings; ``chunk`` is the lowering's option (``budget`` is ignored)."""
    if k.shape[1] == 0:
        return k.new_empty(k.shape)
    return _Chunked.apply(k, v, w, u, _chunk_size(chunk, k.shape[1]))
