"""The ``fft`` lowering of ``stationary`` for long kernels: any rank, any geometry, O(N log N) per channel pair.

On the valid direct form (see ``fused_conv.direct_form``) y[p] = Σ_t W[t] x̃[s·p + d·t] is a correlation, so with
the dilated kernel zero-padded to the input's size, Y = X · conj(W) in the frequency domain. A circular transform of
the input's own length suffices: a valid output p reads x̃[p .. p + d(k-1)], which never wraps. Stride subsamples
the stride-1 result. Exact up to floating-point round-off (complex64 for float32 inputs, complex128 for float64).
The weight's spectrum is kept in the active ``RuntimeState`` while the weight is unchanged.

The 1-d, stride-1 case (the long causal convolutions of the recurrent families) has its own tuned path in ``fft.py``,
whose ("stationary", "fft") entry hands every other geometry to ``conv_fft`` here; this module registers the entry
itself only when nothing else has.
"""

from __future__ import annotations

import torch

from ...ir.core import Node
from .fused_conv import add_bias, conv_static, direct_of
from .registry import LOWERINGS, register
from .runtime import cached


def conv_fft(x, weight, bias=None, *, layer="", **geometry):
    dc = direct_of(x, weight, geometry, layer)
    out_size = dc.out_size
    xp, w = dc.x, dc.weight
    rank = xp.dim() - 2
    dims = tuple(range(-rank, 0))
    size = xp.shape[2:]
    # Dilate the kernel by inserting zeros, then pad it to the input's length.
    k = w.shape[2:]
    wd = w.new_zeros(*w.shape[:2], *[d * (kk - 1) + 1 for kk, d in zip(k, dc.dilation, strict=True)])
    wd[(slice(None), slice(None), *[slice(None, None, d) for d in dc.dilation])] = w
    xf = torch.fft.rfftn(xp, s=size, dim=dims)
    n, g = xp.shape[0], dc.groups
    cin_g, cout = w.shape[1], w.shape[0]
    freq = xf.shape[2:]

    def weight_spectrum() -> torch.Tensor:  # [g, F, C/g, O/g], laid out for the batched product below
        wf = torch.fft.rfftn(wd, s=size, dim=dims).conj()
        return wf.reshape(g, cout // g, cin_g, -1).permute(0, 3, 2, 1).contiguous()

    key = (layer, "fft-weight", tuple(size), tuple(dc.dilation), bool(geometry["transposed"]))
    wf = cached(key, (weight,), weight_spectrum)
    # Per group and frequency one [N, C/g] × [C/g, O/g] product: a batched matmul over (group, frequency), on
    # contiguous operands (strided complex batches make bmm copy every matrix).
    xf = xf.reshape(n, g, cin_g, -1).permute(1, 3, 0, 2).contiguous()  # [g, F, N, C/g]
    yf = torch.matmul(xf, wf).permute(2, 0, 3, 1).reshape(n, cout, *freq)
    y = torch.fft.irfftn(yf, s=size, dim=dims)
    idx = (slice(None), slice(None), *[slice(0, (o - 1) * s + 1, s) for o, s in zip(out_size, dc.stride, strict=True)])
    return add_bias(y[idx].contiguous(), bias)


def _entry(node: Node):
    return conv_fft, conv_static(node)


if ("stationary", "fft") not in LOWERINGS:
    register("stationary", "fft")(_entry)
