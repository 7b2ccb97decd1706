"""The ``lowrank`` lowering of pair-kernel transforms (``dot_exp`` now, ``mlp`` later): K(i, j) ≈ φ(i)ᵀψ(j), then
y_i = φ(i)ᵀ Σ_j ψ(j) v_jᵀ [/ φ(i)ᵀ Σ_j ψ(j)] in O(N·r·d) instead of O(N²·d).

Spec: ``lowrank:method=favor,rank=64,seed=0`` (see ``LowRankOptions``). Methods:

- ``favor``: positive orthogonal random features (FAVOR+, Choromanski et al.), unbiased for exp(s⟨q, k⟩); variance
  grows with the logit scale, so peaked attention needs a high rank.
- ``nystrom``: r landmark columns, through the kernel's own ``nystrom`` (for ``dot_exp``: classical Nyström of the
  positive-definite Gaussian kernel hidden in exp(⟨x, y⟩), see ``DotExpKernel.nystrom``); exact when every column
  is a landmark. Factors are signed. Under causal support the landmarks summarise the whole sequence: values stay
  causal, but φ(i) depends on later keys.
- ``learned``: FAVOR-shaped features exp(Ωx - ‖x‖²/2) with separate query and key maps Ω_q, Ω_k per head, fitted
  by Adam to the exact outputs of calibration activations (a sample of rows, at most ``calib`` columns; causal layers
  are fitted on their first ``calib`` positions). They are fitted on the first call made under an active
  ``RuntimeState`` and reused from it afterwards (the first forward is the calibration pass); with no active state
  every call fits anew.

Causal support (row i sees j ≤ i) is computed by prefix sums over chunks of ``chunk`` rows: a running Σ ψ vᵀ state
carries the past chunks; inside a chunk the kernel is evaluated exactly (``local=1``, the default: O(N·chunk·d) more
work, and the early rows, whose short prefixes make factorised normalisers fragile, become exact) or factorised too
(``local=0``, the pure linear-attention recurrence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ...errors import ItnetError
from ...ir.core import Node
from ...ir.families import DotExpAttrs
from ...ir.lowerings.options import LowRankOptions
from .pairkernel import DotExpKernel, Factors, PairKernel, causal_keep, expand_kv, orthogonal_gaussian, stabilised
from .registry import register
from .runtime import cached, persistable


def linear_transform(
    phi, psi, v, *, causal: bool, normalized: bool, chunk: int = 256, diagonal=None, log_diagonal: bool = False
) -> torch.Tensor:
    """y_i = Σ_{j∈S(i)} φ_iᵀψ_j v_j [/ Σ_{j∈S(i)} φ_iᵀψ_j]: φ [*b, L_q, r], ψ [*b, L_k, r], v [*b, L_k, d].

    Causal: ``diagonal(c0, c1, j1)``, when given, returns the kernel block of rows [c0, c1) × columns [c0, j1)
    (in the factors' units; its log when ``log_diagonal``) to use instead of the factorised one inside each chunk, so
    only the past is factorised."""
    lq, lk = phi.shape[-2], psi.shape[-2]
    if not causal:
        num = phi @ (psi.transpose(-2, -1) @ v)
        return num / _safe(phi @ psi.sum(-2)[..., None]) if normalized else num
    state = phi.new_zeros(*phi.shape[:-2], phi.shape[-1], v.shape[-1])
    zsum = phi.new_zeros(*phi.shape[:-2], phi.shape[-1], 1)
    out = v.new_empty(*v.shape[:-2], lq, v.shape[-1])
    for c0 in range(0, lq, chunk):
        c1 = min(c0 + chunk, lq)
        ph = phi[..., c0:c1, :]
        num, den = ph @ state, ph @ zsum
        j1 = min(c1, lk)
        if c0 < j1:
            ps, vs = psi[..., c0:j1, :], v[..., c0:j1, :]
            keep = causal_keep(c0, c1, c0, j1, ph.device)
            if diagonal is not None and log_diagonal:
                # exact logits in the factors' units can pass the dtype's range where the factorised past is ~1:
                # both parts of a row are scaled by e^{-t}, t = max(0, its largest exact logit), which cancels
                logb = diagonal(c0, c1, j1).masked_fill(~keep, float("-inf"))
                t = logb.amax(-1, keepdim=True).clamp(min=0).nan_to_num(0.0, posinf=0.0)
                shrink = torch.exp(-t)
                a = torch.exp(logb - t)
                num, den = num * shrink, den * shrink
            else:
                block = diagonal(c0, c1, j1) if diagonal is not None else ph @ ps.transpose(-2, -1)
                a = block * keep
            num, den = num + a @ vs, den + a.sum(-1, keepdim=True)
            state = state + ps.transpose(-2, -1) @ vs
            zsum = zsum + ps.sum(-2)[..., None]
        out[..., c0:c1, :] = num / _safe(den) if normalized else num
    return out


def _safe(den: torch.Tensor) -> torch.Tensor:
    """Denominators that vanish (every feature underflowed, or signed factors cancelled) are left tiny, not zero."""
    return torch.where(den == 0, torch.full_like(den, torch.finfo(den.dtype).tiny), den)


# ---------------------------------------------------------------------------------------------- learned features


@persistable
@dataclass(frozen=True)
class LearnedFeatures:
    """Per-head feature maps: log φ(x) = Ω_q x - ‖x‖²/2, log ψ(y) = Ω_k y - ‖y‖²/2, with x = √s·q, y = √s·k."""

    omega_q: torch.Tensor  # [H, r, D]
    omega_k: torch.Tensor  # [H, r, D]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"omega_q": self.omega_q, "omega_k": self.omega_k}

    @staticmethod
    def from_tensors(t: dict[str, torch.Tensor], layer: str) -> LearnedFeatures:
        oq, ok = t.get("omega_q"), t.get("omega_k")
        if oq is None or ok is None or oq.dim() != 3 or oq.shape != ok.shape or not oq.is_floating_point():
            raise ItnetError("fitted low-rank features must be two float tensors omega_q, omega_k of one shape "
                             "[heads, rank, dim]; re-run itnet calibrate", layer=layer)  # fmt: skip
        return LearnedFeatures(oq, ok)

    def features(self, kernel: DotExpKernel) -> Factors:
        heads, dim = kernel.q.shape[1], kernel.q.shape[-1]
        if self.omega_q.shape[0] != heads or self.omega_q.shape[-1] != dim:
            raise ItnetError(f"fitted low-rank features are for {self.omega_q.shape[0]} heads of dim "
                             f"{self.omega_q.shape[-1]}, the layer has {heads} of dim {dim}; re-run itnet calibrate",
                             layer=kernel.layer or None)  # fmt: skip
        root = math.sqrt(kernel.scale)
        lq = _log_features(kernel.q * root, self.omega_q.to(kernel.q.device, kernel.q.dtype))
        lk = _log_features(kernel.k * root, self.omega_k.to(kernel.k.device, kernel.k.dtype))
        bias = kernel.column_bias()
        if bias is not None:
            lk = lk + bias[..., None]
        return stabilised(lq, lk, exact_units=True)


def _log_features(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D], omega [H, r, D] -> [B, H, L, r]."""
    proj = torch.einsum("bhld,hrd->bhlr", x, omega)
    return proj - 0.5 * (x * x).sum(-1, keepdim=True) - 0.5 * math.log(omega.shape[1])


def learned_features(q, k, v, *, scale: float, causal: bool, opts: LowRankOptions, layer: str) -> LearnedFeatures:
    """The layer's fitted features: from the active state (a calibrated bundle's, or the first forward's), else
    fitted now on these activations (the calibration pass)."""
    key = (layer, "learned", opts.rank, opts.seed, opts.steps, opts.lr, opts.calib, opts.loss)
    return cached(key, (), lambda: fit_features(q, k, v, scale=scale, causal=causal, opts=opts))


def fit_features(q, k, v, *, scale: float, causal: bool, opts: LowRankOptions) -> LearnedFeatures:
    """Fit Ω_q, Ω_k (FAVOR-initialised) on calibration activations: to the exact attention weights (``loss=weights``,
    the soft-label cross-entropy Hedgehog distils feature maps with) or to the exact outputs (``loss=outputs``)."""
    k, v = expand_kv(q, k), expand_kv(q, v)
    gen = torch.Generator().manual_seed(opts.seed)
    lq, lk = q.shape[-2], k.shape[-2]
    n_cols = min(lk, opts.calib)
    n_rows = min(lq, max(1, n_cols // 4))
    cols = torch.randperm(lk, generator=gen)[:n_cols].sort().values
    # Causal: the lowering computes each row's own chunk exactly and factorises the past before it, so the fit sees
    # rows as the lowering forms them (rows from the whole length past the first chunk): exact logits on the sampled
    # columns of the row's own chunk, the factorised ones before it. That teaches the factors the past's mass
    # against the exact part, not only its shape.
    first = opts.chunk if causal and lq > opts.chunk else 0
    rows = (first + torch.randperm(lq - first, generator=gen)[:n_rows]).sort().values
    with torch.inference_mode(False), torch.enable_grad():
        qc = (q[..., rows, :].detach() * math.sqrt(scale)).double()
        kc = (k[..., cols, :].detach() * math.sqrt(scale)).double()
        vc = v[..., cols, :].detach().double()
        dead = torch.zeros(len(rows), n_cols, dtype=torch.bool)
        own = torch.zeros(len(rows), n_cols, dtype=torch.bool)
        if causal:
            dead = cols[None, :] > rows[:, None]
            own = ~dead & (cols[None, :] >= (rows // opts.chunk * opts.chunk)[:, None]) if opts.local else own
        live = ~(dead | own).all(-1)  # a row with no sampled column in its factorised past has nothing to teach
        qc, dead, own = qc[..., live, :], dead[live], own[live]
        exact = (qc @ kc.transpose(-2, -1)).masked_fill(dead, float("-inf"))
        weights = torch.softmax(exact, -1)
        target = weights @ vc
        heads, dim = q.shape[1], q.shape[-1]
        init = torch.stack([orthogonal_gaussian(opts.rank, dim, gen, torch.float64) for _ in range(heads)])
        omega_q = init.clone().requires_grad_(True)
        omega_k = init.clone().requires_grad_(True)
        optim = torch.optim.Adam([omega_q, omega_k], lr=opts.lr)
        scale_ref = target.pow(2).sum().clamp_min(1e-300)
        for _ in range(opts.steps):
            fq, fk = _log_features(qc, omega_q), _log_features(kc, omega_k)
            sq, sk = fq.amax(-1, keepdim=True).detach(), fk.amax(-1, keepdim=True).detach()
            kmat = (fq - sq).exp() @ (fk - sk).exp().transpose(-2, -1)  # φψᵀ, each row and column rescaled
            logk = kmat.clamp_min(1e-300).log() + sq + sk.transpose(-2, -1)
            logk = torch.where(own, exact, logk).masked_fill(dead, -1e30)
            if opts.loss == "weights":  # Hedgehog: soft-label cross-entropy of the factorised weights
                loss = -(weights * torch.log_softmax(logk, -1)).sum() / weights.sum()
            else:
                loss = (torch.softmax(logk, -1) @ vc - target).pow(2).sum() / scale_ref
            optim.zero_grad()
            loss.backward()
            optim.step()
    return LearnedFeatures(omega_q.detach().to(q.dtype), omega_k.detach().to(q.dtype))


# ---------------------------------------------------------------------------------------------- the lowering


def lowrank_transform(kernel: PairKernel, v: torch.Tensor, opts: LowRankOptions, factors: Factors | None = None):
    """The generic part: factors from ``kernel`` (favor, nystrom) unless given, then the factorised transform.

    Under causal support with ``local=1`` and factors in known units, each diagonal chunk uses the exact kernel:
    rows see their recent past exactly (the first chunk entirely), the factors carry only the older past."""
    if factors is None and opts.method == "favor":
        factors = kernel.features(opts.rank, opts.seed)
    elif factors is None and opts.method == "nystrom":
        factors = kernel.nystrom(opts.rank, opts.landmarks, opts.seed)
    elif factors is None:
        raise ItnetError(f"lowrank method {opts.method!r} needs a family-specific fit", layer=kernel.layer or None)
    diagonal = None
    if kernel.causal and opts.local and factors.log_scale is not None:
        scale = factors.log_scale

        def diagonal(c0: int, c1: int, j1: int) -> torch.Tensor:
            blk = kernel.block(slice(c0, c1), slice(c0, j1))
            return blk + scale[..., c0:c1, None] if kernel.normalized else blk

    return linear_transform(
        factors.phi,
        factors.psi,
        v,
        causal=kernel.causal,
        normalized=kernel.normalized,
        chunk=opts.chunk,
        diagonal=diagonal,
        log_diagonal=kernel.normalized,
    )


def attention_lowrank(q, k, v, mask=None, *, scale, causal, return_weights, layer="", **options):
    """Softmax attention through a rank-r factorisation of its kernel."""
    if return_weights:
        raise ItnetError("the lowrank lowering cannot return attention weights; use dense", layer=layer or None)
    opts = LowRankOptions.make(layer, **options)
    kernel = DotExpKernel(q, k, mask, scale=scale, causal=causal, layer=layer)
    factors = None
    if opts.method == "learned":
        factors = learned_features(q, k, v, scale=scale, causal=causal, opts=opts, layer=layer).features(kernel)
    return lowrank_transform(kernel, expand_kv(q, v), opts, factors)


OPTIONS = tuple(f.name for f in fields(LowRankOptions))


@register("dot_exp", "lowrank")
def _(node: Node, opts: object):
    a = node.attrs
    assert isinstance(a, DotExpAttrs)
    static = {"scale": a.scale, "causal": a.support == "causal", "return_weights": a.return_weights}
    return attention_lowrank, {**static, "layer": node.name}
