"""Torch lowerings of ``wkv`` (RWKV's WKV, layouts in ``ir/wkv.py``): ``scan`` and ``chunked``.

Notation: b batch, t time, c channel; a = -w the log-decay per step. Both carry the state of each channel as
(num, den, m): the real numerator and denominator are num·e^m and den·e^m, m the running maximum of the log-weights,
so no e^{k} is ever formed unscaled. The maxima only scale: the result does not depend on them, so they are detached
from autograd (the gradient through them cancels exactly), and gradients flow through the exponentials alone.
Arithmetic is in float32 at least (float64 stays float64); the output is cast to k's dtype, as transformers does.
"""

from __future__ import annotations

import torch

from ...ir.core import Node
from .registry import register

# The maximum of an empty past, as transformers' CPU path starts it: exp(NEG - anything finite) is 0.
NEG = -1e38


def _prepare(k, v, w, u):
    acc = torch.promote_types(k.dtype, torch.float32)
    b, _, c = k.shape
    state = [k.new_zeros(b, c, dtype=acc), k.new_zeros(b, c, dtype=acc), k.new_full((b, c), NEG, dtype=acc)]
    return acc, -w.to(acc), u.to(acc), state


def wkv_scan(k, v, w, u):
    """One step per time, vectorised over batch × channels: exactly the arithmetic of transformers'
    ``rwkv_linear_attention_cpu`` (the same maxima, exponentials and products, in the same order)."""
    acc, a, u, (num, den, m) = _prepare(k, v, w, u)
    outs = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t].to(acc), v[:, t].to(acc)
        m_out = torch.maximum(m, kt + u).detach()
        e1, e2 = torch.exp(m - m_out), torch.exp(kt + u - m_out)
        outs.append(((e1 * num + e2 * vt) / (e1 * den + e2)).to(k.dtype))
        m_next = torch.maximum(m + a, kt).detach()
        e1, e2 = torch.exp(m + a - m_next), torch.exp(kt - m_next)
        num, den, m = e1 * num + e2 * vt, e1 * den + e2, m_next
    if not outs:
        return k.new_empty(k.shape)
    return torch.stack(outs, 1)


def _chunk(kc, vc, a, u, num, den, m):
    """One chunk of n steps for all channels at once: its outputs and the state after it.

    Within the chunk, row l reads column j < l with log-weight (l-1-j)·a + k_j, the diagonal with u + k_l, and the
    state (the past before the chunk) with l·a + m; after it, the state is e^{n·a} S + Σ_j e^{(n-1-j)·a + k_j} v_j.
    """
    n = kc.shape[1]
    pos = torch.arange(n, device=kc.device)
    dist = (pos[:, None] - 1 - pos[None, :]).to(kc.dtype)  # [l, j]
    lw = dist[None, :, :, None] * a + kc[:, None]  # [b, l, j, c]
    diag = (pos[:, None] == pos[None, :])[None, :, :, None]
    below = (pos[:, None] >= pos[None, :])[None, :, :, None]
    lw = torch.where(diag, (u + kc)[:, None], lw).masked_fill(~below, float("-inf"))
    ls = pos.to(kc.dtype)[None, :, None] * a + m[:, None]  # [b, l, c]
    top = torch.maximum(lw.amax(2), ls).detach()
    e, es = torch.exp(lw - top[:, :, None]), torch.exp(ls - top)
    out = ((e * vc[:, None]).sum(2) + es * num[:, None]) / (e.sum(2) + es * den[:, None])
    lj = (n - 1 - pos).to(kc.dtype)[None, :, None] * a + kc  # [b, j, c]
    lso = m + n * a
    m_next = torch.maximum(lj.amax(1), lso).detach()
    ej, eso = torch.exp(lj - m_next[:, None]), torch.exp(lso - m_next)
    return out, (ej * vc).sum(1) + eso * num, ej.sum(1) + eso * den, m_next


def wkv_chunked(k, v, w, u, *, chunk: int = 32, budget: float = float(1 << 24)):
    """Dense within chunks of ``chunk`` steps ([n, n] log-weight matrices per channel), the stabilised state passed
    between them; channels are taken in groups whose chunk matrices hold at most ``budget`` elements."""
    b, L, C = k.shape
    if L == 0:
        return k.new_empty(k.shape)
    n = max(1, min(int(chunk), L))
    group = max(1, min(C, int(budget // max(1, b * n * n))))
    if group < C:
        parts = [
            wkv_chunked(k[..., c0 : c0 + group], v[..., c0 : c0 + group], w[c0 : c0 + group], u[c0 : c0 + group],
                        chunk=chunk, budget=budget)
            for c0 in range(0, C, group)
        ]  # fmt: skip
        return torch.cat(parts, -1)
    acc, a, u, (num, den, m) = _prepare(k, v, w, u)
    outs = []
    for t0 in range(0, L, n):
        out, num, den, m = _chunk(k[:, t0 : t0 + n].to(acc), v[:, t0 : t0 + n].to(acc), a, u, num, den, m)
        outs.append(out)
    return torch.cat(outs, 1).to(k.dtype)


@register("wkv", "scan")
def _(node: Node, opts: object):
    return wkv_scan, {}


@register("wkv", "chunked")
def _(node: Node, opts: object):
    return wkv_chunked, {"chunk": opts.chunk, "budget": opts.budget}  # type: ignore[attr-defined]
