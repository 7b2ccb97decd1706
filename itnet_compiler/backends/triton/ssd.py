"""Triton lowering of ``ssm`` ``chunked`` (SSD, Mamba-2's "state space duality" form): dense tiles within chunks,
the state passed between chunks; forward and backward, rendered from ``templates.SSD``.

Takes one scalar decay per head (A [H], Mamba2). The elementwise preparation stays in torch, so autograd chains
through it: Δ = clamp(softplus?(dt + dt_bias)) exactly as the torch lowerings form it, and the log-decays a = Δ A. The
kernels take x, Δ, a, B, C (head h reading group h // R), D and h0, and return y and the final state; their backward
returns dx, dΔ, da, dB, dC (per head, summed over a group's heads here), dD and dh0. Per-state decays (A [H, N],
Mamba) and complex A run on the torch backend with a reason, as do head dims over 128 and states over 256 (one tile
holds a chunk's whole [P, N] state). For training the forward keeps the state entering each chunk (float32,
B·H·(L/Q)·P·N, Q times less than the sequential scan keeps) and the backward recomputes the rest per chunk.

The chunk is the lowering's ``chunk`` (the model's ``chunk_size`` unless the spec overrides it) capped at
``MAX_CHUNK``: a chunk's [Q, Q] decay tile lives in registers, and the result does not depend on the chunk.
"""

from __future__ import annotations

import torch
import triton

from ..torch.recurrent import _delta
from . import loader, templates

MAX_CHUNK = 64
BLOCK_S = 1024  # state elements per program of the passes over chunks
# Warps of the per-chunk kernels: the best of bench/gpu_ssd.py's sweep on an H100 at B8 H24 P64 N128 L2048 bf16
# (forward 4: 0.95 ms vs 1.11 (8) and 5.6 (2); backward 4: fwd+bwd 3.4 ms vs 4.3 (8) and 8.0 (16)).
FWD_WARPS = 4
BWD_WARPS = 4


def kernels():
    source = loader.render(templates.SSD, {"TITLE": "ssm chunked (SSD)", "KERNEL": templates.SSD_KERNEL})
    return loader.load("ssm_chunked", source)


def _blocks(P: int, N: int, Q: int) -> dict[str, int]:
    # tl.dot wants every tile side >= 16
    p2 = triton.next_power_of_2
    return {"BLOCK_Q": max(16, p2(Q)), "BLOCK_P": max(16, p2(P)), "BLOCK_N": max(16, p2(N))}


def _strides(*ts: torch.Tensor) -> list[int]:
    return [s for t in ts for s in t.stride()]


class _Ssd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, a, B, C, D, h0, chunk):
        bsz, L, H, P = x.shape
        G, N = B.shape[-2:]
        q = max(1, min(int(chunk), MAX_CHUNK, L))
        nc = -(-L // q)
        blocks = _blocks(P, N, q)
        prec = loader.dot_precision(x.dtype)
        f32 = dict(dtype=torch.float32, device=x.device)
        states = torch.empty(bsz, H, nc, P, N, **f32)
        last = torch.empty(bsz, H, nc, **f32)
        ht = torch.empty(bsz, H, P, N, **f32)
        y = torch.empty(bsz, L, H, P, dtype=x.dtype, device=x.device)
        k = kernels()
        grid = (bsz * H, nc)
        k.ssd_chunk_state[grid](x, delta, a, B, states, last, H, H // G, L, q, nc, P, N, *_strides(x, B),
                                DOT_PREC=prec, num_warps=FWD_WARPS, **blocks)  # fmt: skip
        h0c = h0.contiguous() if h0 is not None else ht
        k.ssd_state_pass[(bsz * H, triton.cdiv(P * N, BLOCK_S))](states, last, h0c, ht, nc, P * N,
                                                                 HAS_H0=h0 is not None, BLOCK_S=BLOCK_S)  # fmt: skip
        k.ssd_chunk_scan[grid](x, delta, a, B, C, D if D is not None else x, states, y, H, H // G, L, q, nc, P, N,
                               *_strides(x, B, C), HAS_D=D is not None, DOT_PREC=prec, num_warps=FWD_WARPS,
                               **blocks)  # fmt: skip
        ctx.save_for_backward(x, delta, a, B, C, D, h0, states, last)
        ctx.q = q
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        x, delta, a, B, C, D, h0, states, last = ctx.saved_tensors
        q = ctx.q
        bsz, L, H, P = x.shape
        G, N = B.shape[-2:]
        R = H // G
        nc = states.shape[2]
        blocks = _blocks(P, N, q)
        prec = loader.dot_precision(x.dtype)
        f32 = dict(dtype=torch.float32, device=x.device)
        dy = (torch.zeros_like(x) if dy is None else dy).contiguous()
        dht = torch.zeros(bsz, H, P, N, **f32) if dht is None else dht.float().contiguous()
        nblk = triton.cdiv(P * N, BLOCK_S)
        dstates = torch.empty(bsz, H, nc, P, N, **f32)
        dlast_parts = torch.empty(bsz, H, nblk, nc, **f32)
        dh0 = torch.empty(bsz, H, P, N, **f32)
        dx = torch.empty(bsz, L, H, P, **f32)
        ddt = torch.empty(bsz, L, H, **f32)
        da = torch.empty(bsz, L, H, **f32)
        dbp = torch.empty(bsz, L, H, N, **f32)
        dcp = torch.empty(bsz, L, H, N, **f32)
        ddp = torch.empty(bsz, H, nc, **f32)
        k = kernels()
        grid = (bsz * H, nc)
        k.ssd_bwd_dstate[grid](dy, a, C, dstates, H, R, L, q, nc, P, N, *C.stride(), DOT_PREC=prec,
                               num_warps=FWD_WARPS, **blocks)  # fmt: skip
        k.ssd_bwd_state_pass[(bsz * H, nblk)](dstates, states, last, dht, dh0, dlast_parts, nc, P * N, nblk,
                                              BLOCK_S=BLOCK_S)  # fmt: skip
        dlast = dlast_parts.sum(2).contiguous()
        k.ssd_bwd_chunk[grid](x, delta, a, B, C, D if D is not None else x, states, dstates, dlast, dy, dx, ddt, da,
                              dbp, dcp, ddp, H, R, L, q, nc, P, N, *_strides(x, B, C), HAS_D=D is not None,
                              DOT_PREC=prec, num_warps=BWD_WARPS, **blocks)  # fmt: skip
        g_b = dbp.view(bsz, L, G, R, N).sum(3)
        g_c = dcp.view(bsz, L, G, R, N).sum(3)
        g_d = None if D is None else ddp.sum((0, 2)).to(D.dtype)
        g_h0 = None if h0 is None else dh0.to(h0.dtype)
        return dx.to(x.dtype), ddt, da, g_b.to(B.dtype), g_c.to(C.dtype), g_d, g_h0, None


def supported(x, dt, A, B, C, *rest, **_: object) -> str | None:
    if A.is_complex() or B.is_complex() or C.is_complex():
        return "complex state (S4D complex form) has no Triton kernel"
    if A.dim() != 1:
        return "per-state decays (A [H, N], Mamba) have no chunked Triton kernel; the 'scan' lowering has one"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype}"
    p, n = x.shape[-1], B.shape[-1]
    if p * n > 64 * 128:  # bench/compile_sm90.py: beyond this the backward tile runs out of registers on sm_90
        return f"state {p}×{n} above 64×128 (one tile holds a chunk's state); the 'scan' lowering takes it"
    return None


def ssd_chunked(x, dt, A, B, C, D=None, dt_bias=None, h0=None, *, dt_softplus, dt_min, dt_max, return_state, chunk,
                **_: object):  # fmt: skip
    """Same contract as the torch ``ssm`` lowerings (see ir/recurrent.py for layouts); ``budget`` is ignored."""
    bsz, L, H, _p = x.shape
    G, N = B.shape[-2:]
    delta = _delta(dt, dt_bias, dt_softplus, dt_min, dt_max).float()
    delta = (delta if delta.dim() == 3 else delta.expand(bsz, L, H)).contiguous()
    a = (delta * A.float()).contiguous()
    b_s = B if B.dim() == 4 else B.expand(bsz, L, G, N)
    c_s = C if C.dim() == 4 else C.expand(bsz, L, G, N)
    y, ht = _Ssd.apply(x, delta, a, b_s, c_s, D, h0, int(chunk))
    return (y, ht) if return_state else y
