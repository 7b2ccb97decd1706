"""Triton lowering of ``gated`` (LSTM, GRU and Elman RNN layers, LSTM projections included; the RNN scan is
``rnn.py``): the sequential part of each layer
and direction is one kernel launch (``templates.LSTM_SCAN``, ``templates.GRU_SCAN``), forward and backward; the input
projections and the weight gradients are GEMMs in torch.

Cell state and gates stay in registers; h_{t-1} is read back from the step's own output (L1) in chunks, so no tile is
ever as large as W_hh. W_hh (and W_hr) stay in registers for the whole sequence when they are small
(``ScanConfig.resident``); otherwise they are streamed from L2 chunk by chunk every step (at H = 256 they do not fit in
one multiprocessor, and Triton has no grid-wide barrier to split them across programs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from ..torch import recurrent as torch_recurrent
from . import loader, rnn, templates

# Weight elements (all gates, and W_hr) kept in registers for the whole sequence at most; above it they are streamed.
RESIDENT_MAX = 16384
# Chunk of the recurrent axis (P or H) streamed per inner step, with tl.dot (16 at least) and with FMAs.
STREAM_BLOCK = 16
FMA_STREAM_BLOCK = 8
# Warps per program when H ≥ 64 (4 below).
NUM_WARPS = 8
# float32 products: "ieee" runs them on FMAs with BLOCK_B sequences per program (None: enough programs for a small
# batch); "tf32" on tensor cores with 16 sequences per program, as torch's cuDNN RNN does when cudnn.allow_tf32 is set.
FP32_PRECISION = "ieee"
FMA_BLOCK_B: int | None = None


def kernels():
    source = loader.render(templates.LSTM_SCAN, {"TITLE": "gated LSTM scan", "KERNEL": templates.LSTM_KERNEL})
    return loader.load("gated_lstm", source)


def gru_kernels():
    source = loader.render(templates.GRU_SCAN, {"TITLE": "gated GRU scan", "KERNEL": templates.GRU_KERNEL})
    return loader.load("gated_gru", source)


@dataclass(frozen=True)
class ScanConfig:
    """Launch shape of one scan: block_b sequences per program; H (and P) padded to block_h (block_p); the recurrent
    products walk P in block_k chunks and H in block_j chunks (the whole axis when resident), on tensor cores (dot)
    or FMAs; prec is tl.dot's input precision."""

    block_b: int
    block_h: int
    block_p: int
    block_k: int
    block_j: int
    resident: bool
    dot: bool
    prec: str
    num_warps: int


def _config(b: int, h: int, p: int, gates: int, proj: bool, dtype: torch.dtype, cuda: bool = True) -> ScanConfig:
    block_h, block_p = max(16, triton.next_power_of_2(h)), max(16, triton.next_power_of_2(p))
    dot = dtype != torch.float32 or FP32_PRECISION != "ieee"
    # FMAs: enough programs to spread a small batch over the GPU (the CPU interpreter runs programs one by one)
    fill = min(16, triton.next_power_of_2(triton.cdiv(b, 16))) if cuda else 16
    block_b = 16 if dot else FMA_BLOCK_B or fill
    resident = (gates + proj) * block_h * block_p <= RESIDENT_MAX
    # the FMA product of a whole axis is a [block_b, block_p, block_h] temporary: it must stay small as well
    resident = resident and (dot or 2 * block_b * block_h * block_p <= RESIDENT_MAX)
    step = max(16, STREAM_BLOCK) if dot else FMA_STREAM_BLOCK
    block_k, block_j = (block_p, block_h) if resident else (min(step, block_p), min(step, block_h))
    prec = "ieee" if dtype == torch.float32 and not dot else "tf32"
    warps = NUM_WARPS if block_h >= 64 else 4
    return ScanConfig(block_b, block_h, block_p, block_k, block_j, resident, dot, prec, warps)


class _LstmScan(torch.autograd.Function):
    """(xp [T, B, 4H], w_hh [4H, P], w_hr [P, H] or None, h0 [B, P], c0 [B, H]) -> (y [T, B, P], h_T, c_T)."""

    @staticmethod
    def forward(ctx, xp, w_hh, w_hr, h0, c0):
        t_len, b, four_h = xp.shape
        h, p = four_h // 4, w_hh.shape[1]
        xp = xp.contiguous()
        y = torch.empty(t_len, b, p, dtype=xp.dtype, device=xp.device)
        f32 = dict(dtype=torch.float32, device=xp.device)
        save = any(ctx.needs_input_grad)  # per-step gates only for a backward (one step, unused, otherwise)
        ct = torch.empty(b, h, **f32)
        gs = torch.empty(t_len if save else 1, b, four_h, **f32)
        cs = torch.empty(t_len if save else 1, b, h, **f32)
        cfg = _config(b, h, p, 4, w_hr is not None, xp.dtype, xp.is_cuda)
        w_hh = w_hh.contiguous()
        wr = w_hh if w_hr is None else w_hr.contiguous()
        w_t = w_hh.t().contiguous()  # [P, 4H]: the forward's chunks of k rows are contiguous
        h0 = h0.to(xp.dtype).contiguous()
        kernels().lstm_fwd[(triton.cdiv(b, cfg.block_b),)](
            xp, w_t, wr, h0, c0.contiguous(), y, ct, gs, cs, t_len, b, h, p,
            PREC=cfg.prec, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
            PROJ=w_hr is not None, RESIDENT=cfg.resident, SAVE=save, DOT=cfg.dot, num_warps=cfg.num_warps,
        )  # fmt: skip
        ctx.has_proj = w_hr is not None
        ctx.save_for_backward(w_hh, wr, h0, c0, y, gs, cs)
        return y, y[-1].clone(), ct.to(xp.dtype)

    @staticmethod
    def backward(ctx, dy, dht, dct):
        w_hh, wr, h0, c0, y, gs, cs = ctx.saved_tensors
        t_len, b, p = y.shape
        h = cs.shape[-1]
        f32 = dict(dtype=torch.float32, device=y.device)
        dy = torch.zeros(t_len, b, p, **f32) if dy is None else dy.float().contiguous()
        dht = torch.zeros(b, p, **f32) if dht is None else dht.float().contiguous()
        dct = torch.zeros(b, h, **f32) if dct is None else dct.float().contiguous()
        dz = torch.empty(t_len, b, 4 * h, **f32)
        dhs = torch.empty(t_len, b, p, **f32) if ctx.has_proj else dz
        dh0, dc0 = torch.empty(b, p, **f32), torch.empty(b, h, **f32)
        cfg = _config(b, h, p, 4, ctx.has_proj, y.dtype, y.is_cuda)
        kernels().lstm_bwd[(triton.cdiv(b, cfg.block_b),)](
            dy, dht, dct, w_hh, wr, gs, cs, c0.contiguous(), dz, dhs, dh0, dc0, t_len, b, h, p,
            PREC=cfg.prec, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_P=cfg.block_p,
            BLOCK_K=cfg.block_k, BLOCK_J=cfg.block_j, PROJ=ctx.has_proj, RESIDENT=cfg.resident,
            DOT=cfg.dot, num_warps=cfg.num_warps,
        )  # fmt: skip
        h_prev = torch.cat([h0.float()[None], y[:-1].float()], 0)
        dw = dz.reshape(-1, 4 * h).t() @ h_prev.reshape(-1, p)
        dwr = None
        if ctx.has_proj:  # dW_hr = Σ_t dh_tᵀ m_t, m_t = o_t tanh c_t recomputed from the saved gates
            m = gs[..., 3 * h :] * torch.tanh(cs)
            dwr = (dhs.reshape(-1, p).t() @ m.reshape(-1, h)).to(wr.dtype)
        return dz.to(y.dtype), dw.to(w_hh.dtype), dwr, dh0.to(h0.dtype), dc0.to(c0.dtype)


class _GruScan(torch.autograd.Function):
    """(xp [T, B, 3H], w_hh [3H, H], b_hh [3H], h0 [B, H]) -> (y [T, B, H], h_T)."""

    @staticmethod
    def forward(ctx, xp, w_hh, b_hh, h0):
        t_len, b, three_h = xp.shape
        h = three_h // 3
        xp = xp.contiguous()
        y = torch.empty(t_len, b, h, dtype=xp.dtype, device=xp.device)
        f32 = dict(dtype=torch.float32, device=xp.device)
        save = any(ctx.needs_input_grad)  # per-step gates only for a backward (one step, unused, otherwise)
        ht = torch.empty(b, h, **f32)
        gs = torch.empty(t_len if save else 1, b, 4 * h, **f32)
        cfg = _config(b, h, h, 3, False, xp.dtype, xp.is_cuda)
        h0 = h0.to(xp.dtype).contiguous()
        gru_kernels().gru_fwd[(triton.cdiv(b, cfg.block_b),)](
            xp, w_hh.t().contiguous(), b_hh.contiguous(), h0, y, ht, gs, t_len, b, h,
            PREC=cfg.prec, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
            RESIDENT=cfg.resident, SAVE=save, DOT=cfg.dot, num_warps=cfg.num_warps,
        )  # fmt: skip
        ctx.save_for_backward(w_hh, b_hh, h0, y, gs)
        return y, ht.to(xp.dtype)

    @staticmethod
    def backward(ctx, dy, dht):
        w_hh, b_hh, h0, y, gs = ctx.saved_tensors
        t_len, b, h = y.shape
        f32 = dict(dtype=torch.float32, device=y.device)
        dy = torch.zeros(t_len, b, h, **f32) if dy is None else dy.float().contiguous()
        dht = torch.zeros(b, h, **f32) if dht is None else dht.float().contiguous()
        dxp, da = torch.empty(t_len, b, 3 * h, **f32), torch.empty(t_len, b, 3 * h, **f32)
        dh0 = torch.empty(b, h, **f32)
        cfg = _config(b, h, h, 3, False, y.dtype, y.is_cuda)
        gru_kernels().gru_bwd[(triton.cdiv(b, cfg.block_b),)](
            dy, dht, w_hh.contiguous(), gs, y, h0, dxp, da, dh0, t_len, b, h,
            PREC=cfg.prec, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_J=cfg.block_j,
            RESIDENT=cfg.resident, DOT=cfg.dot, num_warps=cfg.num_warps,
        )  # fmt: skip
        h_prev = torch.cat([h0.float()[None], y[:-1].float()], 0)
        dw = da.reshape(-1, 3 * h).t() @ h_prev.reshape(-1, h)
        db = da.sum((0, 1))
        return dxp.to(y.dtype), dw.to(w_hh.dtype), db.to(b_hh.dtype), dh0.to(h0.dtype)


def _gru_direction(xs, h, w_ih, w_hh, b_ih, b_hh, reverse):
    if reverse:
        xs = xs.flip(0)
    xp = F.linear(xs, w_ih, b_ih)
    b_hh = b_hh if b_hh is not None else w_hh.new_zeros(w_hh.shape[0])
    y, ht = _GruScan.apply(xp, w_hh, b_hh, h)
    return (y.flip(0) if reverse else y), ht


def _direction(xs, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    if reverse:
        xs = xs.flip(0)
    xp = F.linear(xs, w_ih, b_ih)
    if b_hh is not None:
        xp = xp + b_hh
    y, ht, ct = _LstmScan.apply(xp, w_hh, w_hr, h, c)
    return (y.flip(0) if reverse else y), ht, ct


def supported(x, weights, *rest, batch_first, hidden_size, proj_size, **_: object) -> str | None:
    """None when the scans take this call, else why not (the layer then runs on the torch backend)."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} (the gated scans take float32, float16 and bfloat16)"
    odd = [w for w in weights if w.dtype != x.dtype or w.device != x.device]
    if odd:
        return f"weights of dtype {odd[0].dtype} on {odd[0].device} with an input of {x.dtype} on {x.device}"
    steps = x.shape[1 if batch_first and x.dim() == 3 else 0]
    if steps == 0:
        return "an empty sequence"
    batch = 1 if x.dim() == 2 else x.shape[0 if batch_first else 1]
    if steps * batch * 4 * max(hidden_size, proj_size) >= 2**31:
        return "per-step buffers of 2³¹ elements or more (the scans index them with 32-bit offsets)"
    return None


def gated_scan(x, weights, h0=None, c0=None, **static):
    """Same contract as the torch ``gated`` lowerings (layouts in ir/recurrent.py): torch's layer/direction loop,
    each direction's sequential part on the Triton scans."""
    return torch_recurrent.gated_scan(x, weights, h0, c0, lstm_direction=_direction, gru_direction=_gru_direction,
                                      rnn_direction=rnn.direction, **static)  # fmt: skip
