"""The ``lowrank`` lowering of ``stationary``: the convolution weight factorised, run as a chain of cheaper convs.

Spec: ``lowrank:method=svd,rank=16`` (see ``ConvLowRankOptions``). Every method works on the valid direct form (any
padding mode, transposed convs included) and per group; C = C_in/groups, O = C_out/groups, T = taps:

- ``svd`` (channel separability): W as [O, C·T] ≈ U_r·(Σ_r V_rᵀ): a conv C → r with the full spatial kernel, then a
  1×1 conv r → O. Cost r·(C·T + O) per point instead of O·C·T; exact at r = min(O, C·T) (Eckart-Young: the best
  rank-r weight in Frobenius norm, so error never grows with r).
- ``spatial`` (spatial separability, Jaderberg et al.): W as [(C, k_1), (O, k_2..)] ≈ rank r: a conv along the first
  spatial dim C → r, then a conv along the others r → O; exact at r = min(C·k_1, O·Π k_rest). Rank ≥ 2 only.
- ``cp``: canonical polyadic decomposition W[o, c, t_1..] ≈ Σ_ρ A[o, ρ] B[c, ρ] Π_k F_k[t_k, ρ] by alternating
  least squares (``iters`` sweeps, seeded start): 1×1 conv C → r, one depthwise conv per spatial dim, 1×1 r → O.
- ``learned``: data-aware channel factors fitted on calibration activations: with Σ the covariance of the input
  patches, U_r = top eigenvectors of W Σ Wᵀ minimises the expected output error E‖W p - U_r U_rᵀ W p‖² (reduced-rank
  regression); then the conv C → r is U_rᵀ W and the 1×1 is U_r. Exact at r = O. Fitted on the first call under an
  active ``RuntimeState`` (the calibration forward) and reused while the weight is unchanged.

Factors are memoised in the active ``RuntimeState`` (keyed by layer and spec, invalidated when the weight changes),
so a built module factorises once, not per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import ItnetError
from ...ir.core import Node
from ...ir.lowerings.options import ConvLowRankOptions
from .fused_conv import DirectConv, add_bias, conv_static, direct_of, point_rows, split_geometry, tap_input, tap_list
from .registry import register
from .runtime import cached

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class ConvChain:
    """A factorised convolution: convs applied in order, each (weight, stride, dilation, groups)."""

    steps: tuple[tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], int], ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv = _CONV[x.dim() - 2]
        for w, stride, dilation, groups in self.steps:
            x = conv(x, w.to(x.dtype), None, stride, 0, dilation, groups)
        return x


def _pointwise(w: torch.Tensor, rank: int) -> torch.Tensor:
    """[O, r] -> a 1×1 conv weight [O, r, 1, ...]."""
    return w.reshape(*w.shape, *([1] * rank))


def _grouped(dc: DirectConv) -> torch.Tensor:
    """The weight per group: [g, O, C, *k]."""
    w = dc.weight
    return w.reshape(dc.groups, w.shape[0] // dc.groups, *w.shape[1:])


def channel_chain(dc: DirectConv, first: torch.Tensor, second: torch.Tensor) -> ConvChain:
    """first [g, r, C·T] (conv C → r with the spatial kernel), second [g, O, r] (1×1 r → O)."""
    g, r = first.shape[:2]
    rank = dc.weight.dim() - 2
    w1 = first.reshape(g * r, *dc.weight.shape[1:])
    w2 = _pointwise(second.reshape(-1, r), rank)
    ones = (1,) * rank
    return ConvChain(((w1, dc.stride, dc.dilation, dc.groups), (w2, ones, ones, dc.groups)))


def svd_chain(dc: DirectConv, opts: ConvLowRankOptions) -> ConvChain:
    w = _grouped(dc).flatten(2).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(opts.rank, s.shape[-1])
    return channel_chain(dc, s[:, :r, None] * vh[:, :r], u[:, :, :r])


def spatial_chain(dc: DirectConv, opts: ConvLowRankOptions, layer: str) -> ConvChain:
    rank = dc.weight.dim() - 2
    if rank < 2:
        raise ItnetError("spatial separability needs a convolution of rank 2 or 3; use method=svd", layer=layer or None)
    w = _grouped(dc).double()  # [g, O, C, k1, *rest]
    g, o, c, k1 = w.shape[:4]
    rest = w.shape[4:]
    mat = w.permute(0, 2, 3, 1, *range(4, w.dim())).reshape(g, c * k1, o * math.prod(rest))
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = min(opts.rank, s.shape[-1])
    a = (u[:, :, :r] * s[:, None, :r]).reshape(g, c, k1, r).permute(0, 3, 1, 2)  # [g, r, C, k1]
    b = vh[:, :r].reshape(g, r, o, *rest).transpose(1, 2)  # [g, O, r, *rest]
    w1 = a.reshape(g * r, c, k1, *([1] * len(rest)))
    w2 = b.reshape(g * o, r, 1, *rest)
    s1, d1 = dc.stride[0], dc.dilation[0]
    first = (w1, (s1,) + (1,) * len(rest), (d1,) + (1,) * len(rest), dc.groups)
    second = (w2, (1, *dc.stride[1:]), (1, *dc.dilation[1:]), dc.groups)
    return ConvChain((first, second))


def cp_als(t: torch.Tensor, rank: int, iters: int, seed: int) -> list[torch.Tensor]:
    """Factors [I_n, R] of every mode with t ≈ Σ_ρ ⊗_n F_n[:, ρ], by alternating least squares (float64)."""
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same start on every device
    facs = [torch.randn(n, rank, generator=gen, dtype=torch.float64).to(t.device) for n in t.shape]
    for _ in range(iters):
        for n in range(t.dim()):
            others = [m for m in range(t.dim()) if m != n]
            kr = facs[others[0]]
            for m in others[1:]:
                kr = (kr[:, None, :] * facs[m][None, :, :]).reshape(-1, rank)
            gram = torch.ones(rank, rank, dtype=torch.float64, device=t.device)
            for m in others:
                gram = gram * (facs[m].T @ facs[m])
            unfolded = t.movedim(n, 0).reshape(t.shape[n], -1)
            facs[n] = unfolded @ kr @ torch.linalg.pinv(gram)
    return facs


def cp_chain(dc: DirectConv, opts: ConvLowRankOptions) -> ConvChain:
    w = _grouped(dc).double()
    g, o, c = w.shape[:3]
    rank = w.dim() - 3
    r = opts.rank
    per_group = [cp_als(w[i], r, opts.iters, opts.seed + i) for i in range(g)]
    ones = (1,) * rank
    first = torch.stack([f[1].T for f in per_group]).reshape(g * r, c, *ones)  # B: C -> r
    steps = [(first, ones, ones, dc.groups)]
    for k in range(rank):
        taps = torch.stack([f[2 + k].T for f in per_group]).reshape(g * r, 1, -1)  # F_k, depthwise along dim k
        shape = [1] * rank
        shape[k] = taps.shape[-1]
        stride = tuple(dc.stride[k] if i == k else 1 for i in range(rank))
        dilation = tuple(dc.dilation[k] if i == k else 1 for i in range(rank))
        steps.append((taps.reshape(g * r, 1, *shape), stride, dilation, g * r))
    last = torch.stack([f[0] for f in per_group]).reshape(g * o, r)  # A: r -> O
    steps.append((_pointwise(last, rank), ones, ones, dc.groups))
    return ConvChain(tuple(steps))


def learned_chain(dc: DirectConv, opts: ConvLowRankOptions) -> ConvChain:
    """Reduced-rank regression on calibration patches (see the module docstring)."""
    taps = tap_list(dc)
    n_points = dc.x.shape[0] * math.prod(dc.out_size)
    gen = torch.Generator().manual_seed(opts.seed)
    pick = torch.randperm(n_points, generator=gen)[: opts.calib].to(dc.x.device)
    patches = torch.stack([point_rows(tap_input(dc, t))[pick] for t in taps], dim=-1)  # [P, C_in, T]
    g = dc.groups
    patches = patches.reshape(patches.shape[0], g, -1).double()  # [P, g, C·T]
    w = _grouped(dc).flatten(2).double()  # [g, O, C·T]
    cov = torch.einsum("pgi,pgj->gij", patches, patches) / patches.shape[0]
    out_cov = w @ cov @ w.transpose(1, 2)  # [g, O, O]
    _, vecs = torch.linalg.eigh(out_cov)
    r = min(opts.rank, w.shape[1])
    u = vecs.flip(-1)[:, :, :r]  # top-r eigenvectors
    return channel_chain(dc, u.transpose(1, 2) @ w, u)


def conv_lowrank(x, weight, bias=None, *, layer="", **kw):
    geometry, options = split_geometry(kw)
    opts = ConvLowRankOptions.make(layer, **options)
    dc = direct_of(x, weight, geometry, layer)
    return add_bias(chain_for(dc, weight, opts, layer)(dc.x), bias)


def chain_for(dc: DirectConv, weight: torch.Tensor, opts: ConvLowRankOptions, layer: str) -> ConvChain:
    """The layer's factorised chain: cached in the active runtime state while the weight is unchanged, except when
    the weight is being trained: then the factors are rebuilt each call, so every step has its own autograd graph
    from the factors back to the weight (a cached graph would be freed by the first backward)."""
    if torch.is_grad_enabled() and weight.requires_grad:
        return factorize(dc, opts, layer)
    return cached((layer, "lowrank", opts), (weight,), lambda: factorize(dc, opts, layer))


def factorize(dc: DirectConv, opts: ConvLowRankOptions, layer: str = "") -> ConvChain:
    """The factorised conv chain; factors are computed in float64 and stored in the weight's dtype."""
    if opts.method == "svd":
        chain = svd_chain(dc, opts)
    elif opts.method == "spatial":
        chain = spatial_chain(dc, opts, layer)
    elif opts.method == "cp":
        chain = cp_chain(dc, opts)
    else:
        chain = learned_chain(dc, opts)
    return ConvChain(tuple((w.to(dc.weight.dtype), s, d, g) for w, s, d, g in chain.steps))


@register("stationary", "lowrank")
def _(node: Node, opts: object):
    return conv_lowrank, conv_static(node)
