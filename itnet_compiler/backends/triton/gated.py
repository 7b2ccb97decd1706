"""Triton lowering of ``gated`` (LSTM and GRU layers): the sequential part of each layer and direction is one kernel
launch (``templates.LSTM_SCAN``, ``templates.GRU_SCAN``), forward and backward; the input projections and the weight
gradients are GEMMs in torch. Hidden state and gates stay in registers; W_hh is re-read from L2 every step (it does
not fit in one multiprocessor's shared memory at H = 256, and Triton has no grid-wide barrier to split it).

LSTMs with projections (``proj_size``) run on the torch backend (recorded as a fallback).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from ..torch import recurrent as torch_recurrent
from . import loader, templates


def kernels():
    source = loader.render(templates.LSTM_SCAN, {"TITLE": "gated LSTM scan", "KERNEL": templates.LSTM_KERNEL})
    return loader.load("gated_lstm", source)


def gru_kernels():
    source = loader.render(templates.GRU_SCAN, {"TITLE": "gated GRU scan", "KERNEL": templates.GRU_KERNEL})
    return loader.load("gated_gru", source)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(b: int, h: int, device: torch.device) -> tuple[int, int]:
    block_h = max(16, triton.next_power_of_2(h))
    return (16 if device.type == "cuda" else 16), block_h


class _LstmScan(torch.autograd.Function):
    """(xp [T, B, 4H], w_hh [4H, H], h0, c0 [B, H]) -> (y [T, B, H], h_T, c_T)."""

    @staticmethod
    def forward(ctx, xp, w_hh, h0, c0):
        t_len, b, four_h = xp.shape
        h = four_h // 4
        xp = xp.contiguous()
        y = torch.empty(t_len, b, h, dtype=xp.dtype, device=xp.device)
        f32 = dict(dtype=torch.float32, device=xp.device)
        ht, ct = torch.empty(b, h, **f32), torch.empty(b, h, **f32)
        gs, cs = torch.empty(t_len, b, four_h, **f32), torch.empty(t_len, b, h, **f32)
        bb, bh = _blocks(b, h, xp.device)
        kernels().lstm_fwd[(triton.cdiv(b, bb),)](
            xp, w_hh.contiguous(), h0.contiguous(), c0.contiguous(), y, ht, ct, gs, cs, t_len, b, h,
            PREC=_prec(xp.dtype), BLOCK_B=bb, BLOCK_H=bh,
        )  # fmt: skip
        ctx.save_for_backward(w_hh, h0, c0, y, gs, cs)
        return y, ht.to(xp.dtype), ct.to(xp.dtype)

    @staticmethod
    def backward(ctx, dy, dht, dct):
        w_hh, h0, c0, y, gs, cs = ctx.saved_tensors
        t_len, b, h = y.shape
        f32 = dict(dtype=torch.float32, device=y.device)
        dy = torch.zeros(t_len, b, h, **f32) if dy is None else dy.float().contiguous()
        dht = torch.zeros(b, h, **f32) if dht is None else dht.float().contiguous()
        dct = torch.zeros(b, h, **f32) if dct is None else dct.float().contiguous()
        dz = torch.empty(t_len, b, 4 * h, **f32)
        dh0, dc0 = torch.empty(b, h, **f32), torch.empty(b, h, **f32)
        bb, bh = _blocks(b, h, y.device)
        kernels().lstm_bwd[(triton.cdiv(b, bb),)](
            dy, dht, dct, w_hh.contiguous(), gs, cs, c0.contiguous(), dz, dh0, dc0, t_len, b, h,
            PREC=_prec(y.dtype), BLOCK_B=bb, BLOCK_H=bh,
        )  # fmt: skip
        h_prev = torch.cat([h0.float()[None], y[:-1].float()], 0)
        dw = dz.reshape(-1, 4 * h).t() @ h_prev.reshape(-1, h)
        return dz.to(y.dtype), dw.to(w_hh.dtype), dh0.to(h0.dtype), dc0.to(c0.dtype)


class _GruScan(torch.autograd.Function):
    """(xp [T, B, 3H], w_hh [3H, H], b_hh [3H], h0 [B, H]) -> (y [T, B, H], h_T)."""

    @staticmethod
    def forward(ctx, xp, w_hh, b_hh, h0):
        t_len, b, three_h = xp.shape
        h = three_h // 3
        xp = xp.contiguous()
        y = torch.empty(t_len, b, h, dtype=xp.dtype, device=xp.device)
        f32 = dict(dtype=torch.float32, device=xp.device)
        ht = torch.empty(b, h, **f32)
        gs = torch.empty(t_len, b, 4 * h, **f32)
        bb, bh = _blocks(b, h, xp.device)
        gru_kernels().gru_fwd[(triton.cdiv(b, bb),)](
            xp, w_hh.contiguous(), b_hh.contiguous(), h0.contiguous(), y, ht, gs, t_len, b, h,
            PREC=_prec(xp.dtype), BLOCK_B=bb, BLOCK_H=bh,
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
        bb, bh = _blocks(b, h, y.device)
        gru_kernels().gru_bwd[(triton.cdiv(b, bb),)](
            dy, dht, w_hh.contiguous(), gs, y, h0.contiguous(), dxp, da, dh0, t_len, b, h,
            PREC=_prec(y.dtype), BLOCK_B=bb, BLOCK_H=bh,
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
    assert w_hr is None, "projections are refused by supported()"
    if reverse:
        xs = xs.flip(0)
    xp = F.linear(xs, w_ih, b_ih)
    if b_hh is not None:
        xp = xp + b_hh
    y, ht, ct = _LstmScan.apply(xp, w_hh, h, c)
    return (y.flip(0) if reverse else y), ht, ct


def supported(x, weights, *rest, cell, proj_size, **_: object) -> str | None:
    if proj_size:
        return "LSTM with projections (proj_size) has no Triton kernel yet"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype}"
    return None


def gated_scan(x, weights, h0=None, c0=None, **static):
    """Same contract as the torch ``gated`` lowerings (layouts in ir/recurrent.py): torch's layer/direction loop,
    each direction's sequential part on the Triton scans."""
    return torch_recurrent.gated_scan(x, weights, h0, c0, lstm_direction=_direction, gru_direction=_gru_direction,
                                      **static)  # fmt: skip
