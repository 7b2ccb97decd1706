"""The ``lowrank`` lowering of the ``mlp`` family: K(i, j) ≈ φ(i)ᵀψ(j), O(N·r) instead of O(N·M).

``method=learned`` fits two small feature networks on calibration data (``itnet calibrate`` / ``itc.calibrate``
keeps them with the program; a first forward fits them otherwise): per point, f = [the point's own first-layer terms
(a, ρ or b, γ), cos ωx, sin ωx] — the random Fourier features of the coordinates, through which the offset terms of
the kernel factorise (cos ω(x − x') = cos ωx cos ωx' + sin ωx sin ωx') — and per head φ = exp(W_φ f) (positive, for
a normalised kernel, distilled from the exact softmax weights with Hedgehog's cross-entropy) or φ = W_φ f (signed, for
the uniform measure, fitted to K by least squares). ``method=nystrom`` takes r landmark rows and columns of K itself
(``cur_factors``): exact at full rank, no fitting. Causal support evaluates the prefix sums by chunks with each
diagonal chunk exact (``local=1``), as the attention lowering does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ItnetError
from ...ir.core import Node
from ...ir.lowerings.options import LowRankOptions
from .lowrank import lowrank_transform
from .mlp import MlpKernel, log_weights, static_options
from .pairkernel import Factors, cur_factors, stabilised
from .registry import register
from .runtime import cached, persistable


def _point_features(first: torch.Tensor | None, own: torch.Tensor, x: torch.Tensor, omega: torch.Tensor):
    """f [B, L, F] of each point: its first-layer terms and the Fourier features of its coordinates."""
    theta = x @ omega.T  # [B|1, L, H_d]
    theta = theta.expand(own.shape[0], *theta.shape[1:])
    parts = [p for p in (first, own) if p is not None] + [torch.cos(theta), torch.sin(theta)]
    return torch.cat(parts, -1)


@persistable
@dataclass(frozen=True)
class MlpFeatures:
    """Per-head linear maps of the point features: w_q [heads, r, F_q], w_k [heads, r, F_k]."""

    w_q: torch.Tensor
    w_k: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w_q": self.w_q, "w_k": self.w_k}

    @staticmethod
    def from_tensors(t: dict[str, torch.Tensor], layer: str) -> MlpFeatures:
        wq, wk = t.get("w_q"), t.get("w_k")
        if wq is None or wk is None or wq.dim() != 3 or wk.dim() != 3 or wq.shape[:2] != wk.shape[:2]:
            raise ItnetError("fitted mlp features must be w_q [heads, rank, F_q] and w_k [heads, rank, F_k]; "
                             "re-run itnet calibrate", layer=layer)  # fmt: skip
        return MlpFeatures(wq, wk)

    def logs(self, kernel: MlpKernel) -> tuple[torch.Tensor, torch.Tensor]:
        omega = kernel.params[2]
        fq = _point_features(kernel.a, kernel.rho, kernel.xq, omega)
        fk = _point_features(kernel.b, kernel.gamma, kernel.xk, omega)
        if fq.shape[-1] != self.w_q.shape[-1] or fk.shape[-1] != self.w_k.shape[-1]:
            raise ItnetError("fitted mlp features do not match the layer's sizes; re-run itnet calibrate",
                             layer=kernel.layer or None)  # fmt: skip
        wq, wk = self.w_q.to(fq.dtype), self.w_k.to(fk.dtype)
        return torch.einsum("blf,hrf->bhlr", fq, wq), torch.einsum("blf,hrf->bhlr", fk, wk)

    def factors(self, kernel: MlpKernel) -> Factors:
        """Factors of K itself (what was fitted), with the measure's column weights put into ψ."""
        lq, lk = self.logs(kernel)
        w = kernel.column_weights()  # [B, heads, cols] or None
        if kernel.normalized:
            return stabilised(lq, lk if w is None else lk + log_weights(w)[..., None], exact_units=True)
        scale = torch.zeros(lq.shape[:-1], dtype=lq.dtype, device=lq.device)
        if w is None:
            return Factors(lq, lk * kernel.point_weight(), scale)
        return Factors(lq, lk * w[..., None], scale)


def fit_features(kernel: MlpKernel, opts: LowRankOptions) -> MlpFeatures:
    """Fit on a sample of rows and columns of the exact kernel (its softmax weights, or its values)."""
    gen = torch.Generator().manual_seed(opts.seed)
    n_cols = min(kernel.cols, opts.calib)
    n_rows = min(kernel.rows, opts.calib)  # the features are per row: the fit must see rows of every kind
    cols = torch.randperm(kernel.cols, generator=gen)[:n_cols].sort().values.to(kernel.rho.device)
    rows = torch.randperm(kernel.rows, generator=gen)[:n_rows].sort().values.to(kernel.rho.device)
    heads = kernel.params[5].shape[0]
    omega = kernel.params[2]
    with torch.no_grad():  # the targets and the point features are data for the fit
        exact = kernel.block(rows, cols, measure=False).double()  # [B, heads, r, c]: K without the measure
        if kernel.causal:
            exact = exact.masked_fill(cols[None, :] > rows[:, None], float("-inf") if kernel.normalized else 0.0)
        sel = lambda t, idx: None if t is None else t[:, idx].detach().double()  # noqa: E731
        fq = _point_features(sel(kernel.a, rows), sel(kernel.rho, rows), kernel.xq[:, rows].double(), omega.double())
        fk = _point_features(sel(kernel.b, cols), sel(kernel.gamma, cols), kernel.xk[:, cols].double(), omega.double())
    with torch.inference_mode(False), torch.enable_grad():
        w_q = (torch.randn(heads, opts.rank, fq.shape[-1], generator=gen, dtype=torch.float64) * 0.1).requires_grad_()
        w_k = (torch.randn(heads, opts.rank, fk.shape[-1], generator=gen, dtype=torch.float64) * 0.1).requires_grad_()
        optim = torch.optim.Adam([w_q, w_k], lr=opts.lr)
        weights = torch.softmax(exact, -1) if kernel.normalized else None
        for _ in range(opts.steps):
            lq = torch.einsum("blf,hrf->bhlr", fq, w_q)
            lk = torch.einsum("blf,hrf->bhlr", fk, w_k)
            if kernel.normalized:  # log φψᵀ by a log-sum-exp over the rank: stable for any magnitude
                logk = torch.logsumexp(lq[..., :, None, :] + lk[..., None, :, :], -1)
                if kernel.causal:
                    logk = logk.masked_fill(cols[None, :] > rows[:, None], -1e30)
                loss = -(weights * torch.log_softmax(logk, -1)).sum() / weights.sum()
            else:
                loss = (lq @ lk.transpose(-2, -1) - exact).pow(2).mean() / exact.pow(2).mean().clamp_min(1e-300)
            optim.zero_grad()
            loss.backward()
            optim.step()
    dt = kernel.rho.dtype
    return MlpFeatures(w_q.detach().to(dt), w_k.detach().to(dt))


def mlp_lowrank(a, b, rho, gamma, xq, xk, v, mu, *params, normalize, causal, features, layer="", measure="uniform",
                **options):  # fmt: skip
    opts = LowRankOptions.make(layer, **options)
    kernel = MlpKernel(a, b, rho, gamma, xq, xk, params, features=tuple(features), normalized=normalize,
                       causal=causal, layer=layer, measure=measure, mu=mu)  # fmt: skip
    if opts.method == "nystrom":
        factors = cur_factors(kernel, opts.rank, opts.landmarks, opts.seed, rho.device)
    elif opts.method == "learned":
        key = (layer, "mlp-learned", opts.rank, opts.seed, opts.steps, opts.lr, opts.calib)
        fitted = cached(key, (), lambda: fit_features(kernel, opts))
        factors = fitted.factors(kernel)
    else:
        raise ItnetError(f"the mlp kernel has no {opts.method!r} factors; use lowrank:method=learned or nystrom",
                         layer=layer or None)  # fmt: skip
    return lowrank_transform(kernel, v, opts, factors)


@register("mlp", "lowrank")
def _(node: Node, opts: object):
    return mlp_lowrank, static_options(node)
