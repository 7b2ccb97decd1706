"""Torch lowerings of the ``mlp`` family (the ITNet layer; math in ``ir/mlp.py``): ``dense``, ``fused``, ``montecarlo``.

``MlpKernel`` is the family's pair kernel (``pairkernel.PairKernel``): K on a tile of (i, j) and at gathered pairs,
weighted by the measure (``uniform`` 1/M, ``counting`` 1, ``importance`` the ``mu`` input: a factor on K, or log μ_j
added to the logits of a normalised kernel, μ_j = 0 removing a point). A row whose support holds no point gives 0.
``fused`` runs the generic tiled transform over it, one row block at a time under activation checkpointing, so a
training step holds one row block's pair activations at once (memory linear in the length, recomputed in the
backward); ``montecarlo`` is the generic importance sampler over the same kernel (norm proposal: ‖v_j‖, the kernel
being learned has no cheap magnitude of its own). All three are differentiable in every input and parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ...errors import ItnetError
from ...ir.core import Node
from ...ir.lowerings.options import MonteCarloOptions
from ...ir.mlp import MlpAttrs
from .montecarlo import montecarlo_transform
from .pairkernel import Factors, Index, causal_keep, fused_transform, gather_rows, softmax_or_zero
from .registry import register
from .runtime import report_error


def pair_logits(
    a, b, rho, gamma, xq, xk, w_off, w_dist, omega, beta, alpha, w_out, b_out, features: tuple[str, ...]
) -> torch.Tensor:
    """K [B, heads, r, c] for rows (a, rho, xq: [B, r, ·]) against columns (b, gamma, xk: [B, c, ·])."""
    z = rho[:, :, None, :] + gamma[:, None, :, :]  # [B, r, c, H_d]
    if "hadamard" in features:
        z = z + a[:, :, None, :] * b[:, None, :, :]
    if any(f in features for f in ("offset", "dist2", "fourier")):
        delta = xq[:, :, None, :] - xk[:, None, :, :]  # [B|1, r, c, d_x]
        if "offset" in features:
            z = z + delta @ w_off.T
        if "dist2" in features:
            z = z + (delta * delta).sum(-1, keepdim=True) * w_dist
        if "fourier" in features:
            z = z + alpha * torch.cos(delta @ omega.T + beta)
    return (F.silu(z) @ w_out.T + b_out).permute(0, 3, 1, 2)


def log_weights(mu: torch.Tensor) -> torch.Tensor:
    """log μ, -inf where μ = 0 (the point is outside the measure); the gradient is taken where μ > 0."""
    tiny = torch.finfo(mu.dtype).tiny
    return torch.where(mu > 0, torch.log(mu.clamp_min(tiny)), torch.full_like(mu, float("-inf")))


class MlpKernel:
    """The ITNet kernel as a pair kernel: logits when normalised, values times the measure's weights otherwise."""

    def __init__(self, a, b, rho, gamma, xq, xk, params, *, features, normalized: bool, causal: bool, layer: str,
                 measure: str = "uniform", mu: torch.Tensor | None = None):  # fmt: skip
        self.a, self.b, self.rho, self.gamma, self.xq, self.xk = a, b, rho, gamma, xq, xk
        self.params = params  # w_off, w_dist, omega, beta, alpha, w_out, b_out
        self.feature_set, self.normalized, self.causal, self.layer = features, normalized, causal, layer
        self.rows, self.cols = rho.shape[1], gamma.shape[1]
        if (mu is not None) != (measure == "importance"):
            raise ItnetError("the importance measure takes the point weights mu [batch, points], and only it does",
                             layer=layer or None)  # fmt: skip
        self.measure, self.mu = measure, mu

    def _rows(self, t, rows):
        return None if t is None else t[:, rows]

    def weigh(self, k: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
        """K [B, heads, r, c] with the measure applied; ``mu`` the columns' weights, broadcastable to K."""
        if self.normalized:
            return k if mu is None else k + log_weights(mu)
        if mu is not None:
            return k * mu
        return k * self.point_weight()

    def point_weight(self) -> float:
        """μ_j of the uniform (1/M) or counting (1) measure."""
        return 1.0 / self.cols if self.measure == "uniform" else 1.0

    def block(self, rows: Index, cols: Index, *, measure: bool = True) -> torch.Tensor:
        k = pair_logits(self._rows(self.a, rows), self._rows(self.b, cols), self.rho[:, rows], self.gamma[:, cols],
                        self.xq[:, rows], self.xk[:, cols], *self.params, self.feature_set)  # fmt: skip
        if not measure:
            return k
        return self.weigh(k, None if self.mu is None else self.mu[:, None, None, cols])

    def column_weights(self) -> torch.Tensor | None:
        """μ as [B, heads, cols] (None for the uniform and counting measures)."""
        if self.mu is None:
            return None
        return self.mu[:, None, :].expand(self.gamma.shape[0], self.params[5].shape[0], self.cols)

    def at(self, rows: slice, idx: torch.Tensor) -> torch.Tensor:
        """K at (i, idx[b, h, i, m]) (or idx [b, h, m] shared by the rows): the gathered columns' terms, per head."""
        batch, heads = idx.shape[0], idx.shape[1]
        shared = idx.dim() == 3
        flat = idx.reshape(batch, -1)  # [B, heads·(r·)M]

        def cols(t):
            if t is None:
                return None
            t = t.expand(batch, *t.shape[1:])
            return gather_rows(t, flat)  # [B, heads·(r·)M, ·]

        b_, g_, x_ = cols(self.b), cols(self.gamma), cols(self.xk)
        r = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
        m = idx.shape[-1]
        out = []
        for h in range(heads):  # each head draws its own columns; the hidden layer is shared by the heads
            sel = slice(h * (m if shared else r * m), (h + 1) * (m if shared else r * m))
            params = list(self.params)
            params[5], params[6] = params[5][h : h + 1], params[6][h : h + 1]
            if shared:
                k = pair_logits(self._rows(self.a, rows), None if b_ is None else b_[:, sel], self.rho[:, rows],
                                g_[:, sel], self.xq[:, rows], x_[:, sel], *params, self.feature_set)  # fmt: skip
                out.append(k[:, 0])  # [B, r, M]
            else:
                k = _pointwise(self, rows, b_, g_, x_, sel, r, m, params, batch)
                out.append(k)
        k = torch.stack(out, 1)
        w = self.column_weights()
        if w is not None:  # the gathered columns' weights: [B, heads, M] shared by the rows, or [B, heads, r, M]
            w = torch.gather(w, -1, idx.reshape(batch, heads, -1)).reshape(idx.shape)
            w = w[:, :, None, :] if shared else w
        return self.weigh(k, w)

    def column_norms(self) -> torch.Tensor:
        w = self.column_weights()  # a point outside the measure is never drawn
        if w is not None:
            return w
        return torch.ones(self.gamma.shape[0], self.params[5].shape[0], self.cols, dtype=self.gamma.dtype,
                          device=self.gamma.device)  # fmt: skip

    def features(self, rank: int, seed: int, temper: float = 1.0) -> Factors:
        raise ItnetError("the mlp kernel has no random features; use montecarlo with proposal=norm or uniform",
                         layer=self.layer or None)  # fmt: skip

    def nystrom(self, rank: int, how: str, seed: int) -> Factors:
        raise ItnetError(
            "the mlp kernel has no lowrank lowering yet; use fused or montecarlo", layer=self.layer or None
        )


def _pointwise(kernel: MlpKernel, rows, b_, g_, x_, sel, r, m, params, bsz: int) -> torch.Tensor:
    """K at per-row gathered columns: [B, r, M] for one head (ρ, a of batch 1 broadcast over the draws' batch)."""
    g = g_[:, sel].reshape(bsz, r, m, -1)
    z = kernel.rho[:, rows, None, :] + g
    if "hadamard" in kernel.feature_set:
        z = z + kernel.a[:, rows, None, :] * b_[:, sel].reshape(bsz, r, m, -1)
    w_off, w_dist, omega, beta, alpha, w_out, b_out = params
    if any(f in kernel.feature_set for f in ("offset", "dist2", "fourier")):
        xq = kernel.xq.expand(bsz, *kernel.xq.shape[1:])[:, rows, None, :]
        delta = xq - x_[:, sel].reshape(bsz, r, m, -1)
        if "offset" in kernel.feature_set:
            z = z + delta @ w_off.T
        if "dist2" in kernel.feature_set:
            z = z + (delta * delta).sum(-1, keepdim=True) * w_dist
        if "fourier" in kernel.feature_set:
            z = z + alpha * torch.cos(delta @ omega.T + beta)
    return (F.silu(z) @ w_out.T + b_out)[..., 0]


def _kernel(a, b, rho, gamma, xq, xk, mu, params, normalize, causal, features, layer, measure) -> MlpKernel:
    return MlpKernel(a, b, rho, gamma, xq, xk, params, features=tuple(features), normalized=normalize, causal=causal,
                     layer=layer, measure=measure, mu=mu)  # fmt: skip


def mlp_dense(a, b, rho, gamma, xq, xk, v, mu, *params, normalize, causal, features, layer="", measure="uniform"):
    """All pairs at once: O(N·M·hidden) memory, the reference."""
    kernel = _kernel(a, b, rho, gamma, xq, xk, mu, params, normalize, causal, features, layer, measure)
    k = kernel.block(slice(None), slice(None))
    if causal:
        keep = causal_keep(0, kernel.rows, 0, kernel.cols, k.device)
        k = k.masked_fill(~keep, float("-inf") if normalize else 0.0)
    if normalize:  # a row whose support holds no point (every weight zero) gives 0
        k = softmax_or_zero(k)
    return k @ v


def mlp_fused(a, b, rho, gamma, xq, xk, v, mu, *params, normalize, causal, features, layer="", measure="uniform",
              block_q=64, block_k=256):  # fmt: skip
    """Tiles of (i, j) with an online softmax; each row block recomputed in the backward (checkpointing), so a step
    holds block_q·M·hidden activations at a time, never N·M·hidden."""
    n = rho.shape[1]
    outs = []
    for i0 in range(0, n, block_q):
        i1 = min(i0 + block_q, n)

        def rows(a, b, rho, gamma, xq, xk, v, mu, *params, i0=i0, i1=i1):
            sl = slice(i0, i1)
            xr = xq[:, sl]
            kernel = _kernel(None if a is None else a[:, sl], b, rho[:, sl], gamma, xr, xk, mu, params, normalize,
                             False, features, layer, measure)  # fmt: skip
            if causal:  # rows i0..i1 see columns up to i1 - 1; the tile mask inside the block keeps j <= i
                return _causal_rows(kernel, v, i0, block_k)
            return fused_transform(kernel, v, block_q=i1 - i0, block_k=block_k)

        args = (a, b, rho, gamma, xq, xk, v, mu, *params)
        grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args)
        outs.append(checkpoint(rows, *args, use_reentrant=False) if grad else rows(*args))
    return torch.cat(outs, dim=2)


def _causal_rows(kernel: MlpKernel, v: torch.Tensor, i0: int, block_k: int) -> torch.Tensor:
    """One row block [i0, i0 + r) of a causal transform: columns j <= i, tiles of block_k."""
    r = kernel.rows
    m_run = v.new_full((*v.shape[:2], r), float("-inf"))
    l_run = torch.zeros_like(m_run)
    acc = v.new_zeros(*v.shape[:2], r, v.shape[-1])
    rows_idx = torch.arange(i0, i0 + r, device=v.device)[:, None]
    for j0 in range(0, i0 + r, block_k):
        j1 = min(j0 + block_k, i0 + r)
        s = kernel.block(slice(None), slice(j0, j1))
        dead = torch.arange(j0, j1, device=v.device)[None, :] > rows_idx
        if not kernel.normalized:
            acc = acc + s.masked_fill(dead, 0.0) @ v[..., j0:j1, :]
            continue
        s = s.masked_fill(dead, float("-inf"))
        m_new = torch.maximum(m_run, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # no point admitted yet
        p = torch.exp(s - m_safe[..., None])
        corr = torch.exp(m_run - m_safe)
        l_run = l_run * corr + p.sum(-1)
        acc = acc * corr[..., None] + p @ v[..., j0:j1, :]
        m_run = m_new
    if not kernel.normalized:
        return acc
    return acc / torch.where(l_run > 0, l_run, torch.ones_like(l_run))[..., None]


def mlp_montecarlo(a, b, rho, gamma, xq, xk, v, mu, *params, normalize, causal, features, layer="", measure="uniform",
                   **options):  # fmt: skip
    """Importance sampling of the j-sum (the generic sampler), with its own error estimate reported."""
    opts = MonteCarloOptions.make(layer, **options)
    kernel = _kernel(a, b, rho, gamma, xq, xk, mu, params, normalize, causal, features, layer, measure)
    out, est = montecarlo_transform(kernel, v, opts)
    if est is not None:
        report_error(layer, est)
    return out


def static_options(node: Node) -> dict[str, object]:
    a = node.attrs
    assert isinstance(a, MlpAttrs)
    return {
        "normalize": a.normalize,
        "causal": a.causal,
        "features": tuple(a.features),
        "layer": node.name,
        "measure": a.measure,
    }


# The backends call these with the node's inputs in role order; ``a`` and ``b`` are None without the Hadamard feature,
# ``mu`` without the importance measure.
@register("mlp", "dense")
def _(node: Node, opts: object):
    return mlp_dense, static_options(node)


@register("mlp", "fused", tiles=("block_q", "block_k"))
def _(node: Node, opts: object):
    return mlp_fused, static_options(node)


@register("mlp", "montecarlo")
def _(node: Node, opts: object):
    return mlp_montecarlo, static_options(node)
