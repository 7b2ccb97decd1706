"""Triton lowering of ``ssm`` (selective and time-invariant diagonal scans: Mamba, Mamba2, S4D in recurrent form):
a forward scan and its reverse-time backward, rendered from ``templates.SSM_SCAN``.

One program per (batch, head) keeps the head's [P × N] state in registers and walks the sequence. For training the
forward writes every state (float32, B·H·L·P·N) so the backward can read h_{t-1}; chunked recomputation would trade
that memory for a second pass and is not done yet. Complex A (S4D in complex form) runs on the torch backend.
"""

from __future__ import annotations

import math

import torch
import triton

from . import loader, templates


def kernels():
    source = loader.render(templates.SSM_SCAN, {"TITLE": "ssm selective scan", "KERNEL": templates.SSM_KERNEL})
    return loader.load("ssm_scan", source)


def _layout(x, dt, A, B, C):
    b, L, H, _ = x.shape
    G, N = B.shape[-2:]
    dt_s = dt if dt.dim() == 3 else dt.expand(b, L, H)
    a = A if A.dim() == 2 else A[:, None].expand(H, N)
    b_s = B if B.dim() == 4 else B.expand(b, L, G, N)
    c_s = C if C.dim() == 4 else C.expand(b, L, G, N)
    return dt_s, a, b_s, c_s


SEQUENTIAL_ONLY = False  # tests flip this to check both forward kernels against each other


def flags_sequential(x: torch.Tensor) -> bool:
    return SEQUENTIAL_ONLY


BLOCK_T = 64  # steps per associative-scan block on the GPU (tuned in bench/gpu.py)
NUM_WARPS = 2  # best of the sweep on an H200 (bench/results/gpu-NVIDIA_H200.json)


def _block_t(x: torch.Tensor) -> int:
    return BLOCK_T if x.is_cuda else 8


def _lim(v: float) -> float:
    return float(v) if math.isfinite(v) else (3.0e38 if v > 0 else -3.0e38)


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, h0, flags):
        dt_softplus, dt_min, dt_max = flags
        bsz, L, H, P = x.shape
        G, N = B.shape[-2:]
        dt_s, a, b_s, c_s = _layout(x, dt, A, B, C)
        y = torch.empty(bsz, L, H, P, dtype=x.dtype, device=x.device)
        ht = torch.empty(bsz, H, P, N, dtype=torch.float32, device=x.device)
        store = any(ctx.needs_input_grad)
        hall = torch.empty((bsz, H, L, P, N) if store else (1,), dtype=torch.float32, device=x.device)
        h0c = h0.contiguous() if h0 is not None else ht
        dummy = x
        common = dict(HAS_D=D is not None, HAS_DTB=dt_bias is not None, HAS_H0=h0 is not None,
                      DT_SOFTPLUS=dt_softplus, STORE_ALL=store, BLOCK_N=max(2, triton.next_power_of_2(N)))  # fmt: skip
        d_arg, b_arg = D if D is not None else dummy, dt_bias if dt_bias is not None else dummy
        if P == 1 and not flags_sequential(x):
            kernels().ssm_fwd_chunk[(bsz * H,)](
                x, dt_s, a, b_s, c_s, d_arg, b_arg, h0c, y, ht, hall, H, H // G, L, N, _lim(dt_min), _lim(dt_max),
                x.stride(0), x.stride(1), x.stride(2), *dt_s.stride(), *a.stride(), *b_s.stride(), *c_s.stride(),
                BLOCK_T=_block_t(x), num_warps=NUM_WARPS if x.is_cuda else 1, **common,
            )  # fmt: skip
        else:
            kernels().ssm_fwd[(bsz * H,)](
                x, dt_s, a, b_s, c_s, d_arg, b_arg, h0c, y, ht, hall, H, H // G, L, P, N, _lim(dt_min),
                _lim(dt_max), *x.stride(), *dt_s.stride(), *a.stride(), *b_s.stride(), *c_s.stride(),
                BLOCK_P=max(2, triton.next_power_of_2(P)), **common,
            )  # fmt: skip
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, h0, hall)
        ctx.flags = flags
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        x, dt, A, B, C, D, dt_bias, h0, hall = ctx.saved_tensors
        dt_softplus, dt_min, dt_max = ctx.flags
        bsz, L, H, P = x.shape
        G, N = B.shape[-2:]
        R = H // G
        dt_s, a, b_s, c_s = _layout(x, dt, A, B, C)
        f32 = dict(dtype=torch.float32, device=x.device)
        dx = torch.empty(bsz, L, H, P, **f32)
        ddt = torch.empty(bsz, L, H, **f32)
        dbp = torch.empty(bsz, L, H, N, **f32)
        dcp = torch.empty(bsz, L, H, N, **f32)
        dap = torch.empty(bsz, H, N, **f32)
        ddp = torch.empty(bsz, H, P, **f32)
        dh0 = torch.empty(bsz, H, P, N, **f32)
        dht = torch.zeros(bsz, H, P, N, **f32) if dht is None else dht.float().contiguous()
        h0c = h0.contiguous() if h0 is not None else dh0
        kernels().ssm_bwd[(bsz * H,)](
            x, dt_s, a, b_s, c_s, D if D is not None else x, dt_bias if dt_bias is not None else x, h0c, hall,
            dy.contiguous(), dht, dx, ddt, dbp, dcp, dap, ddp, dh0, H, R, L, P, N, _lim(dt_min), _lim(dt_max),
            *x.stride(), *dt_s.stride(), *a.stride(), *b_s.stride(), *c_s.stride(), HAS_D=D is not None,
            HAS_DTB=dt_bias is not None, HAS_H0=h0 is not None, DT_SOFTPLUS=dt_softplus,
            BLOCK_P=max(2, triton.next_power_of_2(P)), BLOCK_N=max(2, triton.next_power_of_2(N)),
        )  # fmt: skip
        g_dt = ddt if dt.dim() == 3 else ddt.sum((0, 1))
        g_a = dap.sum(0) if A.dim() == 2 else dap.sum((0, 2))
        g_b = dbp.view(bsz, L, G, R, N).sum(3)
        g_c = dcp.view(bsz, L, G, R, N).sum(3)
        if B.dim() == 2:
            g_b, g_c = g_b.sum((0, 1)), g_c.sum((0, 1))
        g_d = ddp.sum((0, 2)) if D is not None else None
        g_bias = ddt.sum((0, 1)) if dt_bias is not None else None
        grads = [dx.to(x.dtype), g_dt.to(dt.dtype), g_a.to(A.dtype), g_b.to(B.dtype), g_c.to(C.dtype),
                 None if D is None else g_d.to(D.dtype), None if dt_bias is None else g_bias.to(dt_bias.dtype),
                 None if h0 is None else dh0.to(h0.dtype)]  # fmt: skip
        return (*grads, None)


def supported(x, dt, A, B, C, *rest, **_: object) -> str | None:
    if A.is_complex() or B.is_complex() or C.is_complex():
        return "complex state (S4D complex form) has no Triton kernel"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype}"
    bsz, L, H, P = x.shape
    training = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                               for t in (x, dt, A, B, C, *rest))  # fmt: skip
    if training and bsz * H * L * P * B.shape[-1] >= 2**31:
        return ("the states the backward keeps (B·H·L·P·N) pass 2³¹ elements, beyond the kernel's 32-bit offsets; "
                "use the chunked lowering")  # fmt: skip
    return None


def ssm_scan(x, dt, A, B, C, D=None, dt_bias=None, h0=None, *, dt_softplus, dt_min, dt_max, return_state, **_):
    """Same contract as the torch ``ssm`` lowerings (see ir/recurrent.py for layouts)."""
    y, ht = _Scan.apply(x, dt, A, B, C, D, dt_bias, h0, (bool(dt_softplus), float(dt_min), float(dt_max)))
    return (y, ht.to(x.dtype)) if return_state else y
