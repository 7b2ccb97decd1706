"""Torch lowerings of the ``stationary`` family (every convolution): ``library`` (ATen conv) and ``dense`` (im2col)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import ItnetError
from ...ir.core import Node
from ...ir.families import StationaryAttrs
from .registry import register

# The seven keywords every stationary lowering takes: the convolution's geometry, as the family's attributes say.
GEOMETRY = ("stride", "padding", "dilation", "groups", "transposed", "output_padding", "padding_mode")


def geometry(node: Node) -> dict[str, object]:
    a = node.attrs
    assert isinstance(a, StationaryAttrs)
    return {k: getattr(a, k) for k in GEOMETRY}


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
        raise ItnetError(
            "transposed convolution with padding larger than dilation·(kernel-1) is not supported by dense"
        )
    return conv_dense(
        up,
        w,
        bias,
        stride=(1,) * rank,
        padding=tuple(pads),
        dilation=dilation,
        groups=groups,
        transposed=False,
        output_padding=(0,) * rank,
        padding_mode="zeros",
    )


@register("stationary", "library")
def _(node: Node, opts: object):
    return conv_library, geometry(node)


@register("stationary", "dense")
def _(node: Node, opts: object):
    return conv_dense, geometry(node)
