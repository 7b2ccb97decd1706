"""The ``fft`` lowering of ``stationary``: 1-d, stride-1 convolutions on a fast FFT length, O(N log N) in the length;
every other geometry goes to the general N-d form in ``fft_conv.py``.

The 1-d case is the causal long convolution of the recurrent models: an S4/S4D kernel as long as the sequence, whose
padded input has 2L - 1 points (a length pocketfft and cuFFT transform slowly; 2L is fast), and Mamba's short causal
conv. torch's convolutions are cross-correlations, y[t] = Σ_k W[k] x_pad[t + k], so the spectrum of W enters
conjugated; any FFT length n ≥ L_pad keeps every needed output free of circular wrap-around, since the kernel is never
longer than the padded input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ir.core import Node
from ...ir.families import StationaryAttrs
from .fft_conv import conv_fft
from .fused_conv import conv_static
from .registry import register


def fast_length(n: int) -> int:
    """The smallest 5-smooth integer ≥ n (lengths pocketfft and cuFFT transform fastest); they lie close together."""
    m = max(1, n)
    while True:
        rest = m
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return m
        m += 1


def conv_fft_1d(x, weight, bias=None, *, padding, groups, padding_mode):
    """y = irfft(rfft(x_pad) · conj(rfft(W))) cut to the valid outputs; an elementwise product for depthwise kernels,
    a per-frequency channel contraction for grouped ones."""
    ((lo, hi),) = padding
    if lo or hi:
        x = F.pad(x, (lo, hi), mode="constant" if padding_mode == "zeros" else padding_mode)
    batch, cin, length = x.shape
    cout, cin_g, taps = weight.shape
    n = fast_length(length)
    xf = torch.fft.rfft(x, n=n)
    wf = torch.fft.rfft(weight, n=n).conj()
    if cin_g == 1 and cout == cin == groups:
        yf = xf * wf[:, 0]
    else:
        freqs = xf.shape[-1]
        yf = torch.einsum(
            "bgcf,gocf->bgof", xf.reshape(batch, groups, cin_g, freqs), wf.reshape(groups, cout // groups, cin_g, freqs)
        ).reshape(batch, cout, freqs)
    y = torch.fft.irfft(yf, n=n)[..., : length - taps + 1]
    if bias is not None:
        y = y + bias[:, None]
    return y.to(x.dtype)


@register("stationary", "fft")
def _(node: Node, opts: object):
    a = node.attrs
    assert isinstance(a, StationaryAttrs)
    if a.rank != 1 or a.transposed or a.stride != (1,) or a.dilation != (1,):
        return conv_fft, conv_static(node)
    return conv_fft_1d, {"padding": a.padding, "groups": a.groups, "padding_mode": a.padding_mode}
