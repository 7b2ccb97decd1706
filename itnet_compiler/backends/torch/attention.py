"""Torch lowerings of the ``dot_exp`` family (softmax attention): ``dense``, ``library`` (SDPA) and ``fused``.

Range: logits are formed as (scale·q)·kᵀ, so only a logit that itself leaves the dtype overflows (SDPA's math backend
orders it so; its CPU flash kernel scales after the product). When a Cauchy–Schwarz bound says one might (float16
q, k of size ~100, float32 ones of ~1e19), ``dense`` and ``fused`` compute in float64, which holds every logit of
narrower inputs: their rows are then the saturated softmax a float64 reference gives, never NaN. SDPA (``library``)
accumulates float16 in float32, but for float32 inputs of ~1e19 and up returns NaN rows, or zeros on short rows,
where its max skips the NaN logits and the row counts as fully masked.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...errors import ItnetError
from ...ir import score_mod
from ...ir.core import Node
from ...ir.families import DotExpAttrs
from .pairkernel import expand_kv, logit_bias
from .registry import register


def _attn_static(node: Node) -> dict[str, object]:
    a = node.attrs
    assert isinstance(a, DotExpAttrs)
    static: dict[str, object] = {"scale": a.scale, "causal": a.causal, "return_weights": a.return_weights}
    if a.window:
        static["window"] = a.window
    if a.score_mod:
        static["score_mod"] = a.score_mod
    return static


@functools.lru_cache(maxsize=256)
def _expr(text: str) -> score_mod.Expr:
    return score_mod.parse(text)


def modify(s: torch.Tensor, text: str, extras, i0: int = 0, j0: int = 0, lq: int = 0, lk: int = 0) -> torch.Tensor:
    """m(s, b, h, i, j, t0..) on a [B, H, rows, cols] tile of scores whose first row is i0 and first column j0
    (lq, lk: the full lengths, which say whether an extra spans the rows or the columns)."""
    e = _expr(text)
    b, h, rows, cols = s.shape
    names = score_mod.variables(e)
    dev = s.device
    env: dict[str, object] = {"s": s}
    index = {
        "b": torch.arange(b, device=dev).view(-1, 1, 1, 1),
        "h": torch.arange(h, device=dev).view(-1, 1, 1),
        "i": torch.arange(i0, i0 + rows, device=dev).view(-1, 1),
        "j": torch.arange(j0, j0 + cols, device=dev),
    }
    env.update({n: t for n, t in index.items() if n in names})
    for n, t in enumerate(extras or ()):
        env[f"t{n}"] = _block(t, i0, i0 + rows, j0, j0 + cols, lq or rows, lk or cols)
    out = score_mod.evaluate(e, env)
    return out.to(s.dtype) if out.dtype != s.dtype else out


def support_keep(lq: int, lk: int, window: int, device: torch.device) -> torch.Tensor:
    """[L_q, L_k] bool: the pairs a causal (window=0) or window(r) support admits (j <= i, and i - j < r)."""
    rows = torch.arange(lq, device=device)[:, None]
    cols = torch.arange(lk, device=device)[None, :]
    keep = cols <= rows
    return keep & (rows - cols < window) if window else keep


def logits_may_overflow(q: torch.Tensor, k: torch.Tensor, scale: float) -> bool:
    """Whether a logit scale·⟨q_i, k_j⟩, or a partial sum of one, may leave q's dtype. By Cauchy–Schwarz each is at
    most |scale|·‖q_i‖·‖k_j‖ ≤ |scale|·‖Q‖·‖K‖ (whole tensors): one pass over q and k, against the O(N²·d) product,
    and enough almost always; when it is not (float16, or huge inputs), the row norms decide. Norms that overflow
    float32 only raise a false alarm (a detour through float64); float64 is never widened further."""
    if q.dtype == torch.float64 or q.numel() == 0 or k.numel() == 0 or scale == 0:
        return False
    limit = torch.finfo(q.dtype).max / abs(scale)
    f32 = torch.float32
    if torch.linalg.vector_norm(q, dtype=f32).item() * torch.linalg.vector_norm(k, dtype=f32).item() <= limit:
        return False
    nq = torch.linalg.vector_norm(q, dim=-1, dtype=f32).amax().item()
    nk = torch.linalg.vector_norm(k, dim=-1, dtype=f32).amax().item()
    return nq * nk > limit  # NaN inputs compare False: float64 would not help them


def _in_float64(fn, q, k, v, mask, extras, sinks=None, **static):
    """``fn`` on float64 copies, its results back in q's dtype: float64 holds every logit of float32 (or narrower)
    inputs, so the softmax saturates (weight on the largest logits) where the narrow product would give NaN."""
    wide = mask if mask is None or mask.dtype == torch.bool else mask.double()
    extras = [t if t.dtype == torch.bool else t.double() for t in extras] if extras else extras
    sinks = sinks.double() if sinks is not None else None
    out = fn(q.double(), k.double(), v.double(), wide, extras, sinks, **static)
    return tuple(t.to(q.dtype) for t in out) if isinstance(out, tuple) else out.to(q.dtype)


def attention_dense(
    q, k, v, mask=None, extras=None, sinks=None, *, scale, causal, return_weights, window=0, score_mod=""
):
    """Materialise the full [B, H, L_q, L_k] kernel: O(N²) memory, the reference. ``sinks`` [H]: a per-head logit
    in every row's softmax with a zero value (its column is dropped after the softmax, as gpt-oss does)."""
    static = {"scale": scale, "causal": causal, "return_weights": return_weights, "window": window,
              "score_mod": score_mod}  # fmt: skip
    if logits_may_overflow(q, k, scale):
        return _in_float64(attention_dense, q, k, v, mask, extras, sinks, **static)
    k, v = expand_kv(q, k), expand_kv(q, v)
    s = torch.matmul(q * scale, k.transpose(-2, -1))
    if score_mod:
        s = modify(s, score_mod, extras)
    bias = logit_bias(mask, s.dtype)
    if bias is not None:
        s = s + bias
    if causal:
        s = s.masked_fill(~support_keep(*s.shape[-2:], window, s.device), float("-inf"))
    if sinks is not None:  # the sink column never empties a row
        s = torch.cat([s, sinks.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    empty = None
    if sinks is None and (bias is not None or window or score_mod):
        empty = s.amax(dim=-1, keepdim=True) == float("-inf")
    if empty is not None:  # a row with no admitted column attends to nothing: 0, as SDPA returns (finite gradients)
        s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    if empty is not None:
        p = p.masked_fill(empty, 0.0)  # out of place: softmax backward reads its output
    out = torch.matmul(p, v)
    return (out, p) if return_weights else out


def attention_library(q, k, v, mask=None, extras=None, sinks=None, *, scale, causal, return_weights, window=0):
    if extras or sinks is not None:
        raise ItnetError("SDPA has no place for a score modification or sinks; use the fused or dense lowering")
    if return_weights or (causal and mask is not None):
        return attention_dense(q, k, v, mask, scale=scale, causal=causal, return_weights=return_weights, window=window)
    gqa = k.shape[1] != q.shape[1]
    if window:  # SDPA has no sliding window: its mask argument carries it (O(N²) bools, still one library call)
        mask, causal = support_keep(q.shape[-2], k.shape[-2], window, q.device), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def attention_fused(
    q, k, v, mask=None, extras=None, sinks=None, *, scale, causal, return_weights, window=0, score_mod="",
    block_q=256, block_k=512,
):  # fmt: skip
    """Tiles of (i, j) with an online softmax (running max and sum): memory O(block_q · block_k), never O(N²).
    Causal and window supports visit only the column tiles they admit."""
    if return_weights:
        raise ItnetError("the fused lowering cannot return attention weights; use dense or library for this layer")
    if logits_may_overflow(q, k, scale):
        static = {"scale": scale, "causal": causal, "return_weights": False, "window": window, "score_mod": score_mod}
        return _in_float64(attention_fused, q, k, v, mask, extras, sinks, **static, block_q=block_q, block_k=block_k)
    k, v = expand_kv(q, k), expand_kv(q, v)
    bias = logit_bias(mask, q.dtype)
    lq, lk = q.shape[-2], k.shape[-2]
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for i0 in range(0, lq, block_q):
        i1 = min(i0 + block_q, lq)
        qi = q[..., i0:i1, :] * scale
        m_run = torch.full(qi.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
        l_run = torch.zeros_like(m_run)
        if sinks is not None:  # the sink starts every row's running max and sum: e^{sink - sink} = 1, value 0
            m_run = sinks.to(q.dtype).view(1, -1, 1).expand_as(m_run).clone()
            l_run = torch.ones_like(m_run)
        acc = torch.zeros(*qi.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        j_end = min(lk, i1) if causal else lk
        j_start = max(0, i0 - window + 1) if window else 0
        for j0 in range(j_start, j_end, block_k):
            j1 = min(j0 + block_k, j_end)
            s = torch.matmul(qi, k[..., j0:j1, :].transpose(-2, -1))
            if score_mod:
                s = modify(s, score_mod, extras, i0, j0, lq, lk)
            if bias is not None:
                s = s + _block(bias, i0, i1, j0, j1, lq, lk)
            if causal and (j1 > i0 or (window and i1 - 1 - j0 >= window)):
                rows = torch.arange(i0, i1, device=q.device)[:, None]
                cols = torch.arange(j0, j1, device=q.device)[None, :]
                dead = (cols > rows) | (rows - cols >= window) if window else cols > rows
                s = s.masked_fill(dead, float("-inf"))
            m_new = torch.maximum(m_run, s.amax(dim=-1))
            # rows that have seen only -inf so far keep a finite reference point
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            corr = torch.exp(m_run - m_safe)
            l_run = l_run * corr + p.sum(dim=-1)
            acc = acc * corr[..., None] + torch.matmul(p, v[..., j0:j1, :])
            m_run = m_new
        out[..., i0:i1, :] = acc / torch.where(l_run > 0, l_run, torch.ones_like(l_run))[..., None]
    return out


def _block(bias: torch.Tensor, i0: int, i1: int, j0: int, j1: int, lq: int, lk: int) -> torch.Tensor:
    """The [i0:i1, j0:j1] tile of a bias that broadcasts to [..., L_q, L_k]."""
    rows = slice(i0, i1) if bias.shape[-2] == lq else slice(None)
    cols = slice(j0, j1) if bias.shape[-1] == lk else slice(None)
    return bias[..., rows, cols]


@register("dot_exp", "dense")
def _(node: Node, opts: object):
    return attention_dense, _attn_static(node)


@register("dot_exp", "library")
def _(node: Node, opts: object):
    return attention_library, _attn_static(node)


@register("dot_exp", "fused", tiles=("block_q", "block_k"))
def _(node: Node, opts: object):
    return attention_fused, _attn_static(node)
