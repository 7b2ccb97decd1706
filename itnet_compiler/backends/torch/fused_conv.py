"""The ``fused`` lowering of ``stationary`` (every convolution): exact, direct, tiled over output positions.

Each tile of output rows (along the first spatial dim) gathers only the input slab it reads and contracts it with the
weight in one product, so the largest temporary is one tile's patches, O(block·C·taps), instead of the O(N·C·taps)
of the im2col ``dense`` lowering. Spec: ``fused`` or ``fused:block=8`` (output rows per tile; default: tiles of about
2^20 patch elements).

Also here, because the other convolution lowerings (montecarlo, lowrank, fft) share it: ``direct_form``, which turns
any convolution (padding modes, transposed) into a *valid*, direct one, y[p] = Σ_t W[t] x̃[s·p + d·t] over a
padded (for transposed: zero-upsampled) input x̃.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import ItnetError
from ...ir.core import Node
from .conv import GEOMETRY, conv_dense, geometry
from .registry import register


@dataclass(frozen=True)
class DirectConv:
    """A valid, direct convolution: ``x`` already padded, ``weight`` [C_out, C_in/g, *k]."""

    x: torch.Tensor
    weight: torch.Tensor
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def out_size(self) -> tuple[int, ...]:
        k = self.weight.shape[2:]
        return tuple(
            (n - d * (kk - 1) - 1) // s + 1
            for n, kk, s, d in zip(self.x.shape[2:], k, self.stride, self.dilation, strict=True)
        )


def direct_form(
    x, weight, *, stride, padding, dilation, groups, transposed, output_padding, padding_mode, layer: str = ""
) -> DirectConv:
    """Any convolution the ``stationary`` family describes, as a valid direct one over a prepared input."""
    rank = x.dim() - 2
    if not transposed:
        pads = [p for lo_hi in reversed(padding) for p in lo_hi]
        if any(pads):
            x = F.pad(x, pads, mode="constant" if padding_mode == "zeros" else padding_mode)
        return DirectConv(x, weight, tuple(stride), tuple(dilation), groups)
    # Transposed: insert stride-1 zeros between inputs, pad by d·(k-1) - p, flip and transpose the kernel.
    n, cin = x.shape[:2]
    k = weight.shape[2:]
    up = x.new_zeros(n, cin, *[(s - 1) * st + 1 for s, st in zip(x.shape[2:], stride, strict=True)])
    up[(slice(None), slice(None), *[slice(None, None, st) for st in stride])] = x
    pads = []
    for i in reversed(range(rank)):
        lo = dilation[i] * (k[i] - 1) - padding[i][0]
        pads += [lo, lo + output_padding[i]]
    if any(p < 0 for p in pads):
        raise ItnetError(
            "transposed convolution with padding larger than dilation·(kernel-1) has no direct form; use library",
            layer=layer or None,
        )
    up = F.pad(up, pads)
    cout_g = weight.shape[1]
    w = weight.reshape(groups, cin // groups, cout_g, *k).transpose(1, 2).reshape(groups * cout_g, cin // groups, *k)
    return DirectConv(up, w.flip(list(range(2, 2 + rank))), (1,) * rank, tuple(dilation), groups)


def tap_list(dc: DirectConv) -> list[tuple[int, ...]]:
    """Every kernel tap t (a multi-index into the spatial kernel dims), in row-major order."""
    return list(itertools.product(*[range(k) for k in dc.weight.shape[2:]]))


def tap_input(dc: DirectConv, t: tuple[int, ...]) -> torch.Tensor:
    """x̃[:, :, s·p + d·t] for every output point p: [N, C_in, *S] (a strided view, no copy)."""
    idx = [slice(None), slice(None)]
    for ti, o, s, d in zip(t, dc.out_size, dc.stride, dc.dilation, strict=True):
        idx.append(slice(d * ti, d * ti + s * (o - 1) + 1, s))
    return dc.x[tuple(idx)]


def point_rows(t: torch.Tensor) -> torch.Tensor:
    """[N, C, *S] -> [N·S, C]: one row per output point."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.reshape(1, -1, *([1] * (y.dim() - 2)))


def nonempty(dc: DirectConv, layer: str) -> DirectConv:
    """Every convolution lowering refuses an empty output with the same one-line error."""
    if any(o <= 0 for o in dc.out_size):
        raise ItnetError(f"the convolution output would be empty ({dc.out_size})", layer=layer or None)
    return dc


def split_geometry(kw: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """(the seven geometry keywords, the rest: the lowering's options) of a stationary lowering's keywords."""
    missing = [k for k in GEOMETRY if k not in kw]
    if missing:
        raise TypeError(f"missing convolution geometry {missing}")
    return {k: kw[k] for k in GEOMETRY}, {k: v for k, v in kw.items() if k not in GEOMETRY}


def direct_of(x, weight, geometry: dict[str, object], layer: str = "") -> DirectConv:
    """``direct_form`` of a layer's geometry, refusing an empty output: the first step of every direct lowering."""
    return nonempty(direct_form(x, weight, **geometry, layer=layer), layer)  # type: ignore[arg-type]


def conv_fused(x, weight, bias=None, *, block=0, layer="", **geometry):
    """Exact convolution by tiles of output rows; memory O(N) beyond the output (the padded input)."""
    dc = direct_of(x, weight, geometry, layer)
    out_size = dc.out_size
    rank = x.dim() - 2
    k = dc.weight.shape[2:]
    taps = math.prod(k)
    if not block:
        per_row = dc.x.shape[0] * dc.x.shape[1] * taps * math.prod(out_size[1:])
        block = max(1, min(out_size[0], 2**20 // max(1, per_row)))
    s0, d0 = dc.stride[0], dc.dilation[0]
    out = dc.x.new_empty(dc.x.shape[0], dc.weight.shape[0], *out_size)
    zeros = tuple((0, 0) for _ in range(rank))
    for a in range(0, out_size[0], block):
        b = min(a + block, out_size[0])
        slab = dc.x.narrow(2, a * s0, (b - 1 - a) * s0 + d0 * (k[0] - 1) + 1)
        out[:, :, a:b] = conv_dense(
            slab,
            dc.weight,
            None,
            stride=dc.stride,
            padding=zeros,
            dilation=dc.dilation,
            groups=dc.groups,
            transposed=False,
            output_padding=(0,) * rank,
            padding_mode="zeros",
        )
    return add_bias(out, bias)


def conv_static(node: Node) -> dict[str, object]:
    """The node's convolution geometry as keyword options (shared by every stationary lowering here); ``layer`` is
    the node's name (its module path, else its SSA name) under which errors are reported and factors cached."""
    return {**geometry(node), "layer": node.name}


@register("stationary", "fused", tiles=("block",))
def _(node: Node, opts: object):
    return conv_fused, conv_static(node)
