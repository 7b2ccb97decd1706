"""Pair kernels: the one interface the generic ``fused``, ``montecarlo`` and ``lowrank`` lowerings evaluate K through.

A transform over a sequence or point set, y_i = Σ_j K(i, j) v_j (divided by Σ_j K(i, j) when normalised), needs
only a few things from its family to be computed by tiles, by sampling or by factors: K on a block of (i, j), K at
gathered pairs, a cheap magnitude per column (for norm-based proposals) and, optionally, positive features
φ(i)ᵀψ(j) ≈ K(i, j). ``dot_exp`` implements them here (``DotExpKernel``); the ``mlp`` family plugs in by writing one
more class with the same methods, and every generic lowering then works for it unchanged.

Conventions: tensors carry leading batch dims ``*b`` (batch, heads); rows index outputs, columns inputs. A
normalised kernel is given in log space (``logits``; ``-inf`` where a mask removes a pair) and is only defined up to
a positive factor per row; an unnormalised kernel is given by its values. Causal support (row i sees j ≤ i, aligned
top-left) is *not* applied by the kernel: each algorithm applies it in its own way (tile masks, prefix-restricted
sampling, prefix sums).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ...errors import ItnetError

Index = slice | torch.Tensor


class PairKernel(Protocol):
    normalized: bool
    causal: bool
    rows: int
    cols: int
    layer: str

    def block(self, rows: Index, cols: Index) -> torch.Tensor:
        """K (logits when normalised) on rows × cols: [*b, |rows|, |cols|]; 1-d index tensors or slices."""
        ...

    def at(self, rows: slice, idx: torch.Tensor) -> torch.Tensor:
        """K at (i, idx[..., i, m]) for i in ``rows``; idx is [*b, |rows|, M] (or [*b, M], shared by all rows)."""
        ...

    def column_norms(self) -> torch.Tensor:
        """[*b, cols]: a cheap non-negative size of column j's kernel factor (‖k_j‖ for dot_exp)."""
        ...

    def features(self, rank: int, seed: int, temper: float = 1.0) -> Factors:
        """Positive φ [*b, rows, rank], ψ [*b, cols, rank] with E[φ_iᵀψ_j] ∝ K(i, j)^temper (a per-row factor
        allowed); ``temper`` 0 lets the kernel pick a power whose features have moderate variance."""
        ...

    def nystrom(self, rank: int, how: str, seed: int) -> Factors:
        """Signed φ, ψ from ``rank`` landmarks with φ_iᵀψ_j ∝ K(i, j) when every column is a landmark."""
        ...


@dataclass(frozen=True)
class Factors:
    """φ [*b, rows, r] and ψ [*b, cols, r] with φ_iᵀψ_j ≈ K(i, j)·exp(log_scale_i).

    ``log_scale`` [*b, rows] says in which units the factors approximate K (exact blocks of K can then be mixed with
    factorised ones, as the causal lowering does on the diagonal); None when the units are unknown."""

    phi: torch.Tensor
    psi: torch.Tensor
    log_scale: torch.Tensor | None


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def stabilised(log_phi: torch.Tensor, log_psi: torch.Tensor, *, exact_units: bool) -> Factors:
    """exp of log-factors after subtracting a max per row (from φ) and per batch entry (from ψ), which only rescale
    rows; ``exact_units``: exp(log φ)ᵀexp(log ψ) approximates K itself, so the log scale is minus those maxima."""
    rmax = _finite(log_phi.amax(-1, keepdim=True))
    kmax = _finite(log_psi.flatten(-2).amax(-1)[..., None, None])
    scale = -(rmax[..., 0] + kmax[..., 0]) if exact_units else None
    return Factors((log_phi - rmax).exp(), (log_psi - kmax).exp(), scale)


def expand_kv(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Repeat grouped key/value heads (GQA/MQA) to the query head count."""
    rep = q.shape[1] // t.shape[1]
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def logit_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool keep-mask as an additive 0 / -inf bias; a float mask is already one."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf")).expand(mask.shape)


def softmax_or_zero(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim; 0 (not NaN) on a row whose every logit is -inf, with finite gradients."""
    dead = torch.isneginf(logits).all(-1, keepdim=True)
    return torch.softmax(logits.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [*b, L, D] at idx [*b, ...] along L -> [*b, ..., D] (batch dims flattened for one gather)."""
    lead = t.shape[:-2]
    n, d = t.shape[-2], t.shape[-1]
    ix = idx.reshape(math.prod(lead), -1)
    ix = ix + torch.arange(ix.shape[0], device=ix.device)[:, None] * n  # rows of the flattened [*b·L, D]
    out = t.reshape(-1, d).index_select(0, ix.flatten())  # whole-row copies: far faster than an expanded gather
    return out.reshape(*lead, *idx.shape[len(lead) :], d)


def orthogonal_gaussian(rank: int, dim: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """[rank, dim] rows orthogonal within blocks of ``dim``, with chi(dim) lengths so that E[ωωᵀ] = I (FAVOR+)."""
    blocks = []
    for _ in range(math.ceil(rank / dim)):
        g = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        qmat, _ = torch.linalg.qr(g)
        blocks.append(qmat.T)
    w = torch.cat(blocks)[:rank]
    lengths = torch.randn(rank, dim, generator=gen, dtype=torch.float64).norm(dim=1)
    return (w * lengths[:, None]).to(dtype)


def log_positive_features(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """log of φ(x) = exp(ωᵀx - ‖x‖²/2)/√r, whose inner products are unbiased for exp(⟨x, y⟩)."""
    return x @ omega.T - 0.5 * (x * x).sum(-1, keepdim=True) - 0.5 * math.log(omega.shape[0])


class DotExpKernel:
    """K(i, j) = exp(scale·⟨q_i, k_j⟩ + b(i, j)), normalised: softmax attention as a pair kernel."""

    normalized = True

    def __init__(self, q, k, mask, *, scale: float, causal: bool, layer: str = ""):
        self.q, self.k = q, expand_kv(q, k)
        self.bias = logit_bias(mask, q.dtype)
        self.scale, self.causal, self.layer = scale, causal, layer
        self.rows, self.cols = q.shape[-2], self.k.shape[-2]

    def _bias_rows(self, rows: Index) -> torch.Tensor | None:
        b = self.bias
        if b is None:
            return None
        return b[..., rows, :] if b.shape[-2] == self.rows else b

    def block(self, rows: Index, cols: Index) -> torch.Tensor:
        s = torch.matmul(self.q[..., rows, :], self.k[..., cols, :].transpose(-2, -1)) * self.scale
        b = self._bias_rows(rows)
        if b is not None:
            s = s + (b[..., cols] if b.shape[-1] == self.cols else b)
        return s

    def at(self, rows: slice, idx: torch.Tensor) -> torch.Tensor:
        qi = self.q[..., rows, :]
        shared = idx.dim() == qi.dim() - 1
        kk = gather_rows(self.k, idx)
        if shared:
            s = torch.matmul(qi, kk.transpose(-2, -1)) * self.scale
        else:  # one [1, d] × [d, M] product per row, batched
            s = torch.matmul(qi[..., None, :], kk.transpose(-2, -1))[..., 0, :] * self.scale
        b = self._bias_rows(rows)
        if b is None:
            return s
        b = b.expand(*s.shape[:-1], self.cols)
        ix = idx[..., None, :].expand(s.shape) if shared else idx
        return s + torch.gather(b, -1, ix)

    def column_norms(self) -> torch.Tensor:
        return self.k.norm(dim=-1)

    def features(self, rank: int, seed: int, temper: float = 1.0) -> Factors:
        """FAVOR+ positive orthogonal random features of K^temper; a bias that varies only over columns multiplies ψ.

        The features' variance grows like exp(s·‖q‖·‖k‖); ``temper`` 0 picks the power that brings that product to 2
        on average, which keeps them informative (a proposal ∝ K^τ still leans towards the large entries of K)."""
        col_bias = self.column_bias()
        if temper <= 0:
            spread = self.scale * float(
                self.q.norm(dim=-1).pow(2).mean().sqrt() * self.k.norm(dim=-1).pow(2).mean().sqrt()
            )
            temper = min(1.0, 2.0 / max(spread, 1e-12))
        gen = torch.Generator().manual_seed(seed)
        omega = orthogonal_gaussian(rank, self.q.shape[-1], gen, self.q.dtype).to(self.q.device)
        root = math.sqrt(self.scale * temper)
        lq = log_positive_features(self.q * root, omega)
        lk = log_positive_features(self.k * root, omega)
        if col_bias is not None:
            lk = lk + temper * col_bias[..., None]
        return stabilised(lq, lk, exact_units=temper == 1.0)

    def nystrom(self, rank: int, how: str, seed: int) -> Factors:
        """Classical Nyström of a positive-definite kernel: with x = √s·q, y = √s·k,
        exp(⟨x, y⟩) = e^{‖x‖²/2} · e^{-‖x-y‖²/2} · e^{‖y‖²/2}. The first factor is per row (cancels), the last per
        column (goes into ψ), and the Gaussian G in the middle is positive definite, so with landmark keys Z:
        G(x, y) ≈ G(x, Z)·G(Z, Z)⁺·G(Z, y), exact for every y in Z, and G(Z, Z) has unit diagonal (well conditioned
        for spread keys). A mask that varies across rows falls back to ``cur_factors``."""
        b = self.bias
        if b is not None and b.shape[-2] != 1:
            return cur_factors(self, rank, how, seed, self.q.device)
        root = math.sqrt(self.scale)
        x, y = self.q * root, self.k * root
        lc = landmark_index(self.cols, rank, how, seed, self.q.device)
        z = y[..., lc, :]
        log_a = -0.5 * torch.cdist(x.double(), z.double()).pow(2)
        log_b = y.double() @ z.double().transpose(-2, -1) - 0.5 * (z.double() ** 2).sum(-1)[..., None, :]
        col_bias = self.column_bias()
        if col_bias is not None:
            log_b = log_b + col_bias.double()[..., None]
        f = stabilised(log_a, log_b, exact_units=True)  # G(x, Z) row-scaled; ψ carries e^{‖y‖²/2 + b}
        core = torch.exp(-0.5 * torch.cdist(z.double(), z.double()).pow(2))
        phi = f.phi @ torch.linalg.pinv(core, hermitian=True)
        scale = f.log_scale - 0.5 * (x.double() ** 2).sum(-1)  # the e^{-‖x‖²/2} that G leaves out of exp(⟨x, y⟩)
        dt = self.q.dtype
        return Factors(phi.to(dt), f.psi.to(dt), scale.to(dt))

    def column_bias(self) -> torch.Tensor | None:
        """The bias as [*b, cols] when it does not vary over rows; ItnetError when it does (not low rank)."""
        b = self.bias
        if b is None:
            return None
        if b.shape[-2] != 1:
            raise ItnetError(
                "a mask that varies across query rows is not low rank; use the fused or montecarlo lowering",
                layer=self.layer or None,
            )
        return b.expand(*self.q.shape[:-2], 1, self.cols)[..., 0, :]


def landmark_index(n: int, m: int, how: str, seed: int, device: torch.device) -> torch.Tensor:
    """``m`` of ``n`` indices, spread evenly (``strided``) or drawn without replacement (``random``)."""
    if m >= n:
        return torch.arange(n, device=device)
    if how == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=gen)[:m].sort().values.to(device)
    return torch.linspace(0, n - 1, m).round().long().unique().to(device)


def cur_factors(kernel: PairKernel, rank: int, how: str, seed: int, device) -> Factors:
    """Nyström for any kernel by index landmarks (CUR): φ = A·pinv(C), ψ = Bᵀ with A = K[:, L], C = K[L, L],
    B = K[L, :], each row-normalised for a normalised kernel (which only rescales rows: A·A⁺·A = A keeps the
    construction exact when every row and column is a landmark). Honours any mask; unstable below full rank when K
    is far from low rank, because C⁺ amplifies its small singular values."""
    lr = landmark_index(kernel.rows, rank, how, seed, device)
    lc = landmark_index(kernel.cols, rank, how, seed + 1, device)

    def part(rows: Index, cols: Index) -> torch.Tensor:
        blk = kernel.block(rows, cols)
        return softmax_or_zero(blk) if kernel.normalized else blk

    a, b = part(slice(None), lc), part(lr, slice(None))
    w = torch.linalg.pinv(part(lr, lc).double()).to(a.dtype)  # m³ and often ill-conditioned: float64
    # Unnormalised: the factors approximate K itself. Normalised: each row of A·W·B sums to about one, in units
    # that the landmarks alone do not fix.
    scale = None if kernel.normalized else torch.zeros(a.shape[:-1], dtype=a.dtype, device=a.device)
    return Factors(a @ w, b.transpose(-2, -1), scale)


def causal_keep(i0: int, i1: int, j0: int, j1: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(i0, i1, device=device)[:, None]
    cols = torch.arange(j0, j1, device=device)[None, :]
    return cols <= rows


def fused_transform(kernel: PairKernel, v: torch.Tensor, *, block_q: int = 256, block_k: int = 512) -> torch.Tensor:
    """Exact y over tiles of (i, j): O(block_q·block_k) temporaries, online max and sum when normalised."""
    lq, lk = kernel.rows, kernel.cols
    out = v.new_empty(*v.shape[:-2], lq, v.shape[-1])
    for i0 in range(0, lq, block_q):
        i1 = min(i0 + block_q, lq)
        m_run = v.new_full((*v.shape[:-2], i1 - i0), float("-inf"))
        l_run = torch.zeros_like(m_run)
        acc = v.new_zeros(*v.shape[:-2], i1 - i0, v.shape[-1])
        j_end = min(lk, i1) if kernel.causal else lk
        for j0 in range(0, j_end, block_k):
            j1 = min(j0 + block_k, j_end)
            s = kernel.block(slice(i0, i1), slice(j0, j1))
            if kernel.causal and j1 > i0:
                keep = causal_keep(i0, i1, j0, j1, s.device)
                s = s.masked_fill(~keep, float("-inf") if kernel.normalized else 0.0)
            if not kernel.normalized:
                acc = acc + torch.matmul(s, v[..., j0:j1, :])
                continue
            m_new = torch.maximum(m_run, s.amax(dim=-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            corr = torch.exp(m_run - m_safe)
            l_run = l_run * corr + p.sum(dim=-1)
            acc = acc * corr[..., None] + torch.matmul(p, v[..., j0:j1, :])
            m_run = m_new
        if kernel.normalized:  # a row that admits no column attends to nothing: 0, as SDPA returns
            acc = acc / torch.where(l_run > 0, l_run, torch.ones_like(l_run))[..., None]
        out[..., i0:i1, :] = acc
    return out
