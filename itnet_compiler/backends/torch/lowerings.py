"""Torch implementations of each (family, lowering): the semantic oracle and the CPU runtime.

Registered next to their code in ``LOWERINGS[(family, name)]``. Each entry takes the node and returns the callable the
generated FX graph calls (with the node's inputs in role order) and its static keyword options.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ...errors import ItnetError
from ...ir.core import Node
from ...ir.families import DotExpAttrs, StationaryAttrs, parse_lowering

Impl = Callable[..., object]
LOWERINGS: dict[tuple[str, str], Callable[[Node], tuple[Impl, dict[str, object]]]] = {}


def register(family: str, name: str):
    def deco(fn):
        LOWERINGS[(family, name)] = fn
        return fn

    return deco


def implementation(node: Node) -> tuple[Impl, dict[str, object]]:
    name, opts = parse_lowering(node.attrs.lowering)
    entry = LOWERINGS.get((node.family, name))
    if entry is None:
        have = sorted(n for f, n in LOWERINGS if f == node.family)
        raise ItnetError(
            f"the torch backend has no '{name}' lowering for family {node.family}; use one of {', '.join(have)}",
            layer=node.layer,
        )
    impl, static = entry(node)
    known = _OPTIONS.get((node.family, name), set())
    bad = set(opts) - known
    if bad:
        raise ItnetError(f"unknown option(s) {sorted(bad)} for lowering '{name}'; known: {sorted(known)}", layer=node.layer)
    return impl, {**static, **opts}


_OPTIONS: dict[tuple[str, str], set[str]] = {("dot_exp", "fused"): {"block_q", "block_k"}}


# ---------------------------------------------------------------------------------------------------- stationary
def _conv_static(node: Node) -> dict[str, object]:
    a = node.attrs
    assert isinstance(a, StationaryAttrs)
    return {
        "stride": a.stride,
        "padding": a.padding,
        "dilation": a.dilation,
        "groups": a.groups,
        "transposed": a.transposed,
        "output_padding": a.output_padding,
        "padding_mode": a.padding_mode,
    }


def _pad_input(x: torch.Tensor, padding, mode: str) -> torch.Tensor:
    pads = [p for lo_hi in reversed(padding) for p in lo_hi]
    if not any(pads):
        return x
    return F.pad(x, pads, mode="constant" if mode == "zeros" else mode)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_library(x, weight, bias=None, *, stride, padding, dilation, groups, transposed, output_padding, padding_mode):
    rank = x.dim() - 2
    if transposed:
        pad = tuple(lo for lo, _ in padding)
        return _CONVT[rank](x, weight, bias, stride, pad, output_padding, groups, dilation)
    symmetric = padding_mode == "zeros" and all(lo == hi for lo, hi in padding)
    if symmetric:
        return _CONV[rank](x, weight, bias, stride, tuple(lo for lo, _ in padding), dilation, groups)
    return _CONV[rank](_pad_input(x, padding, padding_mode), weight, bias, stride, 0, dilation, groups)


def conv_dense(x, weight, bias=None, *, stride, padding, dilation, groups, transposed, output_padding, padding_mode):
    """Explicit im2col: gather every (output point, tap) pair, then one contraction. O(N·taps) memory."""
    rank = x.dim() - 2
    if transposed:
        return _convt_dense(x, weight, bias, stride, padding, dilation, groups, output_padding)
    xp = _pad_input(x, padding, padding_mode)
    k = weight.shape[2:]
    patches = xp
    for i in range(rank):
        span = dilation[i] * (k[i] - 1) + 1
        patches = patches.unfold(2 + i, span, stride[i])
    # patches: [N, C, *out, *span]; keep every dilation-th tap
    idx = (slice(None),) * (2 + rank) + tuple(slice(None, None, d) for d in dilation)
    patches = patches[idx]
    n, c = x.shape[:2]
    out_sp = patches.shape[2 : 2 + rank]
    cg = c // groups
    patches = patches.reshape(n, groups, cg, *out_sp, *k)
    w = weight.reshape(groups, weight.shape[0] // groups, cg, *k)
    letters = "hij"[:rank]
    taps = "xyz"[:rank]
    y = torch.einsum(f"ngc{letters}{taps},goc{taps}->ngo{letters}", patches, w)
    y = y.reshape(n, weight.shape[0], *out_sp)
    if bias is not None:
        y = y + bias.reshape(1, -1, *([1] * rank))
    return y


def _convt_dense(x, weight, bias, stride, padding, dilation, groups, output_padding):
    """Transposed conv as a direct conv: insert stride-1 zeros, pad by d·(k-1)-p, flip and transpose the kernel."""
    rank = x.dim() - 2
    n, cin = x.shape[:2]
    k = weight.shape[2:]
    sp = x.shape[2:]
    up_shape = [n, cin, *[(s - 1) * st + 1 for s, st in zip(sp, stride, strict=True)]]
    up = x.new_zeros(up_shape)
    up[(slice(None), slice(None), *[slice(None, None, st) for st in stride])] = x
    pads = []
    for i in range(rank):
        full = dilation[i] * (k[i] - 1)
        pads.append((full - padding[i][0], full - padding[i][0] + output_padding[i]))
    cout_g = weight.shape[1]
    w = weight.reshape(groups, cin // groups, cout_g, *k).transpose(1, 2).reshape(groups * cout_g, cin // groups, *k)
    w = w.flip(list(range(2, 2 + rank)))
    neg = [p for p in pads if p[0] < 0 or p[1] < 0]
    if neg:
        raise ItnetError("transposed convolution with padding larger than dilation·(kernel-1) is not supported by dense")
    return conv_dense(up, w, bias, stride=(1,) * rank, padding=tuple(pads), dilation=dilation, groups=groups,
                      transposed=False, output_padding=(0,) * rank, padding_mode="zeros")


@register("stationary", "library")
def _(node: Node):
    return conv_library, _conv_static(node)


@register("stationary", "dense")
def _(node: Node):
    return conv_dense, _conv_static(node)


# ------------------------------------------------------------------------------------------------------ dot_exp
def _attn_static(node: Node) -> dict[str, object]:
    a = node.attrs
    assert isinstance(a, DotExpAttrs)
    return {"scale": a.scale, "causal": a.support == "causal", "return_weights": a.return_weights}


def _expand_kv(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    rep = q.shape[1] // t.shape[1]
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def _logit_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf")).expand(mask.shape)


def attention_dense(q, k, v, mask=None, *, scale, causal, return_weights):
    """Materialise the full [B, H, L_q, L_k] kernel: O(N²) memory, the reference."""
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    bias = _logit_bias(mask, s.dtype)
    if bias is not None:
        s = s + bias
    if causal:
        lq, lk = s.shape[-2:]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.matmul(p, v)
    return (out, p) if return_weights else out


def attention_library(q, k, v, mask=None, *, scale, causal, return_weights):
    if return_weights:
        return attention_dense(q, k, v, mask, scale=scale, causal=causal, return_weights=True)
    gqa = k.shape[1] != q.shape[1]
    if causal and mask is not None:
        return attention_dense(q, k, v, mask, scale=scale, causal=True, return_weights=False)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def attention_fused(q, k, v, mask=None, *, scale, causal, return_weights, block_q=256, block_k=512):
    """Tiles of (i, j) with an online softmax (running max and sum): memory O(block_q · block_k), never O(N²)."""
    if return_weights:
        raise ItnetError("the fused lowering cannot return attention weights; use dense or library for this layer")
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    bias = _logit_bias(mask, q.dtype)
    lq, lk = q.shape[-2], k.shape[-2]
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for i0 in range(0, lq, block_q):
        i1 = min(i0 + block_q, lq)
        qi = q[..., i0:i1, :] * scale
        m_run = torch.full(qi.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
        l_run = torch.zeros_like(m_run)
        acc = torch.zeros(*qi.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        j_end = min(lk, i1) if causal else lk
        for j0 in range(0, j_end, block_k):
            j1 = min(j0 + block_k, j_end)
            s = torch.matmul(qi, k[..., j0:j1, :].transpose(-2, -1))
            if bias is not None:
                s = s + _block(bias, i0, i1, j0, j1, lq, lk)
            if causal and j1 > i0:
                rows = torch.arange(i0, i1, device=q.device)[:, None]
                cols = torch.arange(j0, j1, device=q.device)[None, :]
                s = s.masked_fill(cols > rows, float("-inf"))
            m_new = torch.maximum(m_run, s.amax(dim=-1))
            # rows that have seen only -inf so far keep a finite reference point
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            corr = torch.exp(m_run - m_safe)
            l_run = l_run * corr + p.sum(dim=-1)
            acc = acc * corr[..., None] + torch.matmul(p, v[..., j0:j1, :])
            m_run = m_new
        out[..., i0:i1, :] = acc / l_run[..., None]
    return out


def _block(bias: torch.Tensor, i0: int, i1: int, j0: int, j1: int, lq: int, lk: int) -> torch.Tensor:
    """The [i0:i1, j0:j1] tile of a bias that broadcasts to [..., L_q, L_k]."""
    rows = slice(i0, i1) if bias.shape[-2] == lq else slice(None)
    cols = slice(j0, j1) if bias.shape[-1] == lk else slice(None)
    return bias[..., rows, cols]


@register("dot_exp", "dense")
def _(node: Node):
    return attention_dense, _attn_static(node)


@register("dot_exp", "library")
def _(node: Node):
    return attention_library, _attn_static(node)


@register("dot_exp", "fused")
def _(node: Node):
    return attention_fused, _attn_static(node)


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
