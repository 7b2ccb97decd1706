"""Triton scan of the Elman cells of ``gated`` (``rnn_tanh``, ``rnn_relu``): h_t = act(XP_t + h_{t-1} W_hhᵀ), one
launch per layer and direction, forward and backward, with the launch shapes of the LSTM / GRU scans (``gated.py``).

The template is ``templates.RNN_SCAN``, beside the LSTM and GRU scans (same prelude and notation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from . import gated, loader
from .templates import RNN_SCAN


def kernels():
    return loader.load("gated_rnn", loader.render(RNN_SCAN, {"TITLE": "gated RNN scan"}))


class _RnnScan(torch.autograd.Function):
    """(xp [T, B, H], w_hh [H, H], h0 [B, H], relu) -> (y [T, B, H], h_T)."""

    @staticmethod
    def forward(ctx, xp, w_hh, h0, relu):
        t_len, b, h = xp.shape
        xp = xp.contiguous()
        y = torch.empty(t_len, b, h, dtype=xp.dtype, device=xp.device)
        cfg = gated._config(b, h, h, 1, False, xp.dtype, xp.is_cuda)
        h0 = h0.to(xp.dtype).contiguous()
        kernels().rnn_fwd[(triton.cdiv(b, cfg.block_b),)](
            xp, w_hh.t().contiguous(), h0, y, t_len, b, h,
            PREC=cfg.prec, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
            RESIDENT=cfg.resident, RELU=relu, DOT=cfg.dot, num_warps=cfg.num_warps,
        )  # fmt: skip
        ctx.relu = relu
        ctx.save_for_backward(w_hh, h0, y)
        return y, y[-1].clone()

    @staticmethod
    def backward(ctx, dy, dht):
        w_hh, h0, y = ctx.saved_tensors
        t_len, b, h = y.shape
        f32 = dict(dtype=torch.float32, device=y.device)
        dy = torch.zeros(t_len, b, h, **f32) if dy is None else dy.float().contiguous()
        dht = torch.zeros(b, h, **f32) if dht is None else dht.float().contiguous()
        dz, dh0 = torch.empty(t_len, b, h, **f32), torch.empty(b, h, **f32)
        cfg = gated._config(b, h, h, 1, False, y.dtype, y.is_cuda)
        kernels().rnn_bwd[(triton.cdiv(b, cfg.block_b),)](
            dy, dht, w_hh.contiguous(), y, dz, dh0, t_len, b, h,
            PREC=cfg.prec, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_J=cfg.block_j,
            RESIDENT=cfg.resident, RELU=ctx.relu, DOT=cfg.dot, num_warps=cfg.num_warps,
        )  # fmt: skip
        h_prev = torch.cat([h0.float()[None], y[:-1].float()], 0)
        dw = dz.reshape(-1, h).t() @ h_prev.reshape(-1, h)
        return dz.to(y.dtype), dw.to(w_hh.dtype), dh0.to(h0.dtype), None


def direction(xs, h, w_ih, w_hh, b_ih, b_hh, reverse, relu):
    """One layer and direction (the signature of the torch backend's ``_rnn_direction``)."""
    if reverse:
        xs = xs.flip(0)
    xp = F.linear(xs, w_ih, b_ih)
    if b_hh is not None:
        xp = xp + b_hh
    y, ht = _RnnScan.apply(xp, w_hh, h, relu)
    return (y.flip(0) if reverse else y), ht
