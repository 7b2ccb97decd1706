"""Torch lowerings of the recurrent families: ``ssm`` (``scan``, ``chunked``, ``dense``) and ``gated`` (``scan``,
``library``; LSTM, GRU and the Elman RNN cells). Layouts are those of ``ir/recurrent.py``.

Notation: b batch, t/l/s time, c chunk, g group, r head within its group (h = g·R + r), p head channel, n state.
A ``[H]`` (Mamba2) decays every state channel of a head alike; an ``A [H, N]`` (Mamba, S4D) decays each one apart, so
the chunked form carries an extra n axis (written n', of size 1 or N) on its decay matrices. The state is kept in
float32 at least (complex when A is), as the reference implementations do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...ir.core import Node
from ...ir.recurrent import GatedAttrs, SsmAttrs
from .registry import register

# ------------------------------------------------------------------------------------------------------------- ssm


def _delta(dt, dt_bias, dt_softplus: bool, dt_min: float, dt_max: float) -> torch.Tensor:
    """Δ = clamp(softplus?(dt + dt_bias)), in the order Mamba and Mamba2 apply them."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_min > -math.inf or dt_max < math.inf:
        dt = dt.clamp(min=dt_min if dt_min > -math.inf else None, max=dt_max if dt_max < math.inf else None)
    return dt


class _Ssm:
    """The inputs of one ssm call, broadcast to the selective layout and split into (group, head-in-group) axes."""

    def __init__(self, x, dt, A, B, C, dt_bias, dt_softplus, dt_min, dt_max):
        self.b, self.L, self.H, self.P = x.shape
        self.G, self.N = B.shape[-2:]
        self.R = self.H // self.G
        real = torch.promote_types(x.dtype, torch.float32)
        self.cdt = torch.promote_types(real, A.dtype)
        self.complex = self.cdt.is_complex
        delta = _delta(dt, dt_bias, dt_softplus, dt_min, dt_max).to(real)
        self.delta = delta if delta.dim() == 3 else delta.expand(self.b, self.L, self.H)
        self.x = x.to(real)
        a = A.to(self.cdt)
        self.a = a if a.dim() == 2 else a[:, None]  # [H, n']
        self.B = (B if B.dim() == 4 else B.expand(self.b, self.L, self.G, self.N)).to(self.cdt)
        self.C = (C if C.dim() == 4 else C.expand(self.b, self.L, self.G, self.N)).to(self.cdt)

    def initial(self, h0) -> torch.Tensor:
        shape = (self.b, self.G, self.R, self.P, self.N)
        if h0 is None:
            return self.x.new_zeros(shape, dtype=self.cdt)
        return h0.to(self.cdt).reshape(shape)

    def finish(self, y, x_dtype, D, h, return_state):
        """Real part, skip term, output dtype and layout; the final state when asked for."""
        if self.complex:
            y = y.real
        y = y.reshape(self.b, self.L, self.H, self.P)
        if D is not None:
            y = y + self.x * D.to(y.dtype)[:, None]
        y = y.to(x_dtype)
        if not return_state:
            return y
        return y, h.reshape(self.b, self.H, self.P, self.N)


def ssm_scan(x, dt, A, B, C, D=None, dt_bias=None, h0=None, *, dt_softplus, dt_min, dt_max, return_state, block=None):
    """Sequential in time, vectorised over batch × heads × channels × state. Decays and inputs are formed ``block``
    steps at a time (by default as many as fill 2²² state elements, so a block stays small), and the loop body is one
    fused multiply-add per step."""
    s = _Ssm(x, dt, A, B, C, dt_bias, dt_softplus, dt_min, dt_max)
    b, G, R, P, N = s.b, s.G, s.R, s.P, s.N
    block = int(block) if block else min(256, max(8, (1 << 22) // (b * s.H * P * N)))
    h = s.initial(h0)
    y = s.x.new_empty(b, s.L, G, R, P, dtype=s.cdt)
    for t0 in range(0, s.L, block):
        t1 = min(t0 + block, s.L)
        d = s.delta[:, t0:t1]
        decay = torch.exp(d[..., None] * s.a).reshape(b, t1 - t0, G, R, 1, -1)
        u = (d[..., None] * s.x[:, t0:t1]).reshape(b, t1 - t0, G, R, P, 1)
        inputs = u * s.B[:, t0:t1, :, None, None, :]
        if torch.is_grad_enabled() and (inputs.requires_grad or decay.requires_grad or h.requires_grad):
            steps = []  # autograd cannot record out= writes: keep every step as its own tensor
            for t in range(t1 - t0):
                h = torch.addcmul(inputs[:, t], decay[:, t], h)
                steps.append(h)
            hs = torch.stack(steps)
        else:
            hs = inputs.new_empty(t1 - t0, b, G, R, P, N)
            for t in range(t1 - t0):
                h = torch.addcmul(inputs[:, t], decay[:, t], h, out=hs[t])
        y[:, t0:t1] = torch.einsum("tbgrpn,btgn->btgrp", hs, s.C[:, t0:t1])
    return s.finish(y, x.dtype, D, h.clone(), return_state)


def _segsum(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """seg[..., l, s] = Σ_{r=s+1..l} a[..., r] for l ≥ s, summed directly (no difference of cumulative sums, which
    cancels badly), and the l ≥ s mask."""
    q = a.shape[-1]
    ones = torch.ones(q, q, dtype=torch.bool, device=a.device)
    x = a[..., None].expand(*a.shape, q).masked_fill(~ones.tril(-1), 0)
    return x.cumsum(-2), ones.tril(0)


def ssm_chunked(
    x, dt, A, B, C, D=None, dt_bias=None, h0=None, *, dt_softplus, dt_min, dt_max, return_state, chunk, budget=1 << 24
):
    """SSD: inside a chunk of ``chunk`` steps the kernel is materialised (a masked [l, s] decay matrix per head, per
    state channel when A is diagonal); between chunks only the state is passed. Chunks are processed in groups whose
    decay matrices hold at most ``budget`` elements."""
    s = _Ssm(x, dt, A, B, C, dt_bias, dt_softplus, dt_min, dt_max)
    b, G, R, P, N, L = s.b, s.G, s.R, s.P, s.N, s.L
    q = max(1, min(int(chunk), L))
    nc = -(-L // q)
    pad = nc * q - L
    nd = s.a.shape[-1]
    a = F.pad((s.delta[..., None] * s.a).reshape(b, L, G, R, nd), (0, 0, 0, 0, 0, 0, 0, pad))
    u = F.pad((s.delta[..., None] * s.x).reshape(b, L, G, R, P).to(s.cdt), (0, 0, 0, 0, 0, 0, 0, pad))
    Bm, Cm = (F.pad(t, (0, 0, 0, 0, 0, pad)).reshape(b, nc, q, G, N).permute(0, 1, 3, 4, 2) for t in (s.B, s.C))
    a = a.reshape(b, nc, q, G, R, nd).permute(0, 1, 3, 4, 5, 2).contiguous()  # [b, c, g, r, n', l]
    u = u.reshape(b, nc, q, G, R, P).permute(0, 1, 3, 4, 2, 5)  # [b, c, g, r, l, p]
    h = s.initial(h0)
    group = nc if budget == math.inf else max(1, int(budget) // (b * q * q * s.H * nd))
    ys = []
    for k0 in range(0, nc, group):
        k = slice(k0, min(k0 + group, nc))
        y, h = _chunk_group(a[:, k], u[:, k], Bm[:, k], Cm[:, k], h)
        ys.append(y)
    y = torch.cat(ys, 1).permute(0, 1, 4, 2, 3, 5).reshape(b, nc * q, G, R, P)[:, :L]
    return s.finish(y, x.dtype, D, h, return_state)


def _chunk_group(a, u, Bm, Cm, h):
    """One group of chunks (a [b, c, g, r, n', l], u [b, c, g, r, l, p], B and C [b, c, g, n, l], h [b, g, r, p, n]):
    intra-chunk outputs from the dense kernel, each chunk's end state from its own inputs, the state recurrence across
    the group (starting from ``h``), and what each chunk's incoming state contributes. Returns y [b, c, g, r, l, p]
    and the state after the group."""
    seg, keep = _segsum(a)  # [b, c, g, r, n', l, s]
    decay = torch.where(keep, seg.exp(), 0)
    last = decay[..., -1, :]  # decay from step s to the chunk's end: [b, c, g, r, n', s]
    cum = a.cumsum(-1)
    if a.shape[4] == 1:  # one decay per head: the kernel is (C Bᵀ) ∘ decay
        kernel = decay[:, :, :, :, 0] * (Cm.transpose(-1, -2) @ Bm)[:, :, :, None]
        states = (u * last[:, :, :, :, 0, :, None]).transpose(-1, -2) @ Bm.transpose(-1, -2)[:, :, :, None]
    else:  # a decay per state channel: Σ_n C_ln decay_nls B_sn
        kernel = (decay * (Cm[..., :, None] * Bm[..., None, :])[:, :, :, None]).sum(4)
        states = ((last * Bm[:, :, :, None]) @ u).transpose(-1, -2)
    y = kernel @ u
    total = cum[..., -1].exp()[..., None, :]  # [b, c, g, r, 1, n']
    starts = []
    for c in range(a.shape[1]):
        starts.append(h)
        h = total[:, c] * h + states[:, c]
    start = torch.stack(starts, 1).transpose(-1, -2)  # [b, c, g, r, n, p]
    into = cum.exp()  # decay from the chunk's start through step l: [b, c, g, r, n', l]
    if a.shape[4] == 1:
        y = y + (Cm.transpose(-1, -2)[:, :, :, None] @ start) * into[:, :, :, :, 0, :, None]
    else:
        y = y + (Cm[:, :, :, None] * into).transpose(-1, -2) @ start
    return y, h


def ssm_dense(x, dt, A, B, C, D=None, dt_bias=None, h0=None, *, dt_softplus, dt_min, dt_max, return_state):
    """The causal kernel materialised over the whole sequence: the chunked form with one chunk of length L."""
    return ssm_chunked(
        x, dt, A, B, C, D, dt_bias, h0, dt_softplus=dt_softplus, dt_min=dt_min, dt_max=dt_max,
        return_state=return_state, chunk=max(1, x.shape[1]), budget=math.inf,
    )  # fmt: skip


def _ssm_static(node: Node) -> dict[str, object]:
    a = node.attrs
    assert isinstance(a, SsmAttrs)
    return {"dt_softplus": a.dt_softplus, "dt_min": a.dt_min, "dt_max": a.dt_max, "return_state": a.return_state}


@register("ssm", "scan", tiles=("block",))
def _(node: Node, opts: object):
    return ssm_scan, _ssm_static(node)


@register("ssm", "chunked")
def _(node: Node, opts: object):
    return ssm_chunked, {**_ssm_static(node), "chunk": node.attrs.chunk}


@register("ssm", "dense")
def _(node: Node, opts: object):
    return ssm_dense, _ssm_static(node)


# ----------------------------------------------------------------------------------------------------------- gated


def _batched(x, h0, c0):
    """An unbatched call ([L, I] input, [layers·dirs, H] states) as a batch of one, the way nn.LSTM/nn.GRU run it."""
    if x.dim() == 3:
        return x, h0, c0, False
    return x.unsqueeze(1), *(None if t is None else t.unsqueeze(1) for t in (h0, c0)), True


def _lstm_direction(xs, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    gates_in = F.linear(xs, w_ih, b_ih)  # every step's input projection at once, as torch's CPU kernel does
    out = xs.new_empty(xs.shape[0], xs.shape[1], h.shape[-1])
    for t in range(xs.shape[0] - 1, -1, -1) if reverse else range(xs.shape[0]):
        gates = F.linear(h, w_hh, b_hh) + gates_in[t]
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = F.linear(h, w_hr)
        out[t] = h
    return out, h, c


def _gru_direction(xs, h, w_ih, w_hh, b_ih, b_hh, reverse):
    gates_in = F.linear(xs, w_ih, b_ih)
    out = xs.new_empty(xs.shape[0], xs.shape[1], h.shape[-1])
    for t in range(xs.shape[0] - 1, -1, -1) if reverse else range(xs.shape[0]):
        ir, iz, i_n = gates_in[t].chunk(3, 1)
        hr, hz, h_n = F.linear(h, w_hh, b_hh).chunk(3, 1)
        r = torch.sigmoid(hr + ir)
        z = torch.sigmoid(hz + iz)
        n = torch.tanh(i_n + h_n * r)
        h = (h - n) * z + n
        out[t] = h
    return out, h


def _rnn_direction(xs, h, w_ih, w_hh, b_ih, b_hh, reverse, relu):
    """The Elman cell h_t = act(x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh), act tanh or relu."""
    gates_in = F.linear(xs, w_ih, b_ih)
    act = torch.relu if relu else torch.tanh
    out = xs.new_empty(xs.shape[0], xs.shape[1], h.shape[-1])
    for t in range(xs.shape[0] - 1, -1, -1) if reverse else range(xs.shape[0]):
        h = act(F.linear(h, w_hh, b_hh) + gates_in[t])
        out[t] = h
    return out, h


def gated_scan(x, weights, h0=None, c0=None, *, cell, hidden_size, proj_size, num_layers, bidirectional, batch_first,
               bias, lstm_direction=None, gru_direction=None, rnn_direction=None):  # fmt: skip
    """Layer by layer, direction by direction, a loop over time; the input projections of all steps are one matmul.
    Other backends pass their own per-direction scans (same signatures as ``_lstm_direction``, ``_gru_direction``,
    ``_rnn_direction``)."""
    lstm_direction = lstm_direction or _lstm_direction
    gru_direction = gru_direction or _gru_direction
    rnn_direction = rnn_direction or _rnn_direction
    xs, h0, c0, unbatched = _batched(x, h0, c0)
    batch_first = batch_first and not unbatched
    xs = xs.transpose(0, 1) if batch_first else xs
    dirs, hout = 2 if bidirectional else 1, proj_size or hidden_size
    batch = xs.shape[1]
    if h0 is None:
        h0 = xs.new_zeros(num_layers * dirs, batch, hout)
    if c0 is None and cell == "lstm":
        c0 = xs.new_zeros(num_layers * dirs, batch, hidden_size)
    per = 2 + 2 * bias + (proj_size > 0)
    hn, cn = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w = list(weights[k * per : (k + 1) * per])
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
            if cell == "lstm":
                w_hr = w[-1] if proj_size else None
                y, h, c = lstm_direction(xs, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, w_hr, d == 1)
                cn.append(c)
            elif cell == "gru":
                y, h = gru_direction(xs, h0[k], w_ih, w_hh, b_ih, b_hh, d == 1)
            else:
                y, h = rnn_direction(xs, h0[k], w_ih, w_hh, b_ih, b_hh, d == 1, cell == "rnn_relu")
            outs.append(y)
            hn.append(h)
        xs = torch.cat(outs, -1) if dirs == 2 else outs[0]
    result = [xs.transpose(0, 1) if batch_first else xs, torch.stack(hn)]
    if cell == "lstm":
        result.append(torch.stack(cn))
    return tuple(t.squeeze(1) for t in result) if unbatched else tuple(result)


def gated_library(x, weights, h0=None, c0=None, *, cell, hidden_size, proj_size, num_layers, bidirectional,
                  batch_first, bias):  # fmt: skip
    """torch's own multi-layer RNN kernel (``torch.lstm`` / ``torch.gru`` / ``torch.rnn_tanh`` / ``torch.rnn_relu``,
    cuDNN on the GPU)."""
    xs, h0, c0, unbatched = _batched(x, h0, c0)
    batch_first = batch_first and not unbatched
    dirs = 2 if bidirectional else 1
    batch = xs.shape[0 if batch_first else 1]
    if h0 is None:
        h0 = xs.new_zeros(num_layers * dirs, batch, proj_size or hidden_size)
    flags = (bias, num_layers, 0.0, False, bidirectional, batch_first)
    if cell != "lstm":
        result = getattr(torch, cell)(xs, h0, list(weights), *flags)
    else:
        if c0 is None:
            c0 = xs.new_zeros(num_layers * dirs, batch, hidden_size)
        result = torch.lstm(xs, (h0, c0), list(weights), *flags)
    return tuple(t.squeeze(1) for t in result) if unbatched else tuple(result)


def _gated_static(node: Node) -> dict[str, object]:
    a = node.attrs
    assert isinstance(a, GatedAttrs)
    return {
        "cell": a.cell,
        "hidden_size": a.hidden_size,
        "proj_size": a.proj_size,
        "num_layers": a.num_layers,
        "bidirectional": a.bidirectional,
        "batch_first": a.batch_first,
        "bias": a.bias,
    }


@register("gated", "scan")
def _(node: Node, opts: object):
    return gated_scan, _gated_static(node)


@register("gated", "library")
def _(node: Node, opts: object):
    return gated_library, _gated_static(node)
