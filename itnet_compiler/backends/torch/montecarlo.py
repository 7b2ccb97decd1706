"""The ``montecarlo`` lowering of pair-kernel transforms (``dot_exp`` now, ``mlp`` later): y_i estimated from M
sampled columns j per row, with the standard error of the estimate computed from the same samples.

Spec: ``montecarlo:samples=128,mode=per_row,proposal=norm,seed=0`` (see ``MonteCarloOptions``).

- ``mode=per_row`` draws M columns for every row from that row's proposal q_i (O(N·M·d) work, gathers);
  ``mode=shared`` draws one set of M columns for all rows of a (batch, head), so the estimate is one dense product
  [N, M] × [M, d]. Under causal support a shared proposal is tilted by 1/(j+1), which gives the prefix [0, i] of every
  row i a share of the samples that grows like log i instead of i/N.
- Proposals (all mixed with a ``defensive`` share of uniform, which keeps every importance weight bounded by
  n_i/defensive): ``uniform``; ``norm``, q(j) ∝ ‖k_j‖·‖v_j‖, the proposal that is optimal for sampled matrix
  products (Drineas-Kannan-Mahoney); ``lowrank``, q_i(j) ∝ φ(i)ᵀψ(j) with positive random features of K^τ (a
  tempered kernel, whose features stay accurate where those of a peaked K are mostly noise). Per-row
  sampling from φᵀψ needs no O(N) work per row: pick a feature c with probability ∝ φ_c(i)·Σ_{j<n_i} ψ_c(j), then j
  by inverse CDF over prefix sums of ψ_c.
- Normalised kernels use self-normalised importance sampling (w = K/q, ŷ = Σ w v / Σ w; variance by the delta
  method, Σ w² ‖v - ŷ‖² / (Σ w)²); unnormalised ones the unbiased mean of K v / q with its sample variance / M.
  A normalised row none of whose samples is usable (all outside its support or masked) is computed exactly.
- Reproducible: one ``torch.Generator`` seeded with ``seed``, consumed in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ...errors import ItnetError
from ...ir.core import Node
from ...ir.families import DotExpAttrs
from ...ir.lowerings.options import MC_MODES, MC_PROPOSALS, MonteCarloOptions
from .pairkernel import DotExpKernel, PairKernel, expand_kv, gather_rows
from .registry import register
from .runtime import ErrorEstimate, report_error

MODES, PROPOSALS = MC_MODES, MC_PROPOSALS


@dataclass
class Proposal:
    """q_i(j) = (1-α)·Σ_c a_ic s_cj / Σ_c a_ic S_c(n_i) + α/n_i on the support j < n_i (S_c: prefix sums of s_c).

    ``col`` (s, [*b, C, cols], non-negative) is None for the plain uniform proposal; ``row`` (a, [*b, rows, C]) is
    None when every row weighs the components alike.
    """

    col: torch.Tensor | None
    row: torch.Tensor | None
    alpha: float
    group: int = 0  # > 0: row i uses component i // group alone (``probe``), ``row`` is None


def build_proposal(kernel: PairKernel, v: torch.Tensor, opts: MonteCarloOptions) -> Proposal:
    if opts.proposal == "uniform":
        return Proposal(None, None, 1.0)
    if opts.proposal == "norm":
        score = kernel.column_norms() * v.norm(dim=-1)
        return Proposal(score[..., None, :].double(), None, float(opts.defensive))
    if opts.proposal == "probe":
        return probe_proposal(kernel, v, opts)
    f = kernel.features(opts.rank, opts.seed + 1, float(opts.temper))
    return Proposal(f.psi.transpose(-2, -1).double(), f.phi.double(), float(opts.defensive))


@torch.no_grad()
def probe_proposal(kernel: PairKernel, v: torch.Tensor, opts: MonteCarloOptions) -> Proposal:
    """Query-aware: per group of ``group`` rows, the mean of ``probes`` stratified rows' exact softmax rows (3/4)
    plus a uniform share on the group's own columns (1/4: the rows' local neighbourhood, which probes earlier in
    the group cannot see under causal support). The group grows where rows·cols·batch would pass 2^25 entries."""
    rows, cols, p = kernel.rows, kernel.cols, opts.probes
    batch = math.prod(v.shape[:-2])
    g = max(opts.group, math.ceil(rows * cols * batch / 2**25))
    n_groups = -(-rows // g)
    gen = torch.Generator().manual_seed(int(opts.seed) + 2)
    starts = torch.arange(n_groups) * g
    n = (rows - starts).clamp(max=g)
    u = torch.rand(n_groups, p, generator=gen, dtype=torch.float64)
    r = starts[:, None] + ((torch.arange(p) + u) / p * n[:, None]).long()
    r = torch.minimum(r, (starts + n - 1)[:, None]).flatten().to(v.device)
    logits = kernel.block(r, slice(None))  # [*b, G·P, cols]
    if kernel.causal:
        logits = logits.masked_fill(torch.arange(cols, device=v.device) > r[:, None], float("-inf"))
    prob = torch.softmax(logits.double(), -1).nan_to_num(0.0)  # a row a mask empties contributes nothing
    pbar = prob.view(*prob.shape[:-2], n_groups, p, cols).mean(-2)
    own = torch.zeros(n_groups, cols, dtype=torch.float64, device=v.device)
    for i, (a, m) in enumerate(zip(starts.tolist(), n.tolist(), strict=True)):
        if a < cols:
            own[i, a : min(a + m, cols)] = 1.0 / (min(a + m, cols) - a)
    return Proposal(0.75 * pbar + 0.25 * own, None, float(opts.defensive), group=g)


def support_sizes(kernel: PairKernel, i0: int, i1: int, device: torch.device) -> torch.Tensor:
    if not kernel.causal:
        return torch.full((i1 - i0,), kernel.cols, device=device, dtype=torch.long)
    return (torch.arange(i0, i1, device=device) + 1).clamp(max=kernel.cols)


class PerRowSampler:
    """Draws M columns per row from a ``Proposal`` restricted to each row's support; returns (idx, log q)."""

    def __init__(self, prop: Proposal, kernel: PairKernel, gen: torch.Generator, batch: tuple[int, ...]):
        self.prop, self.kernel, self.gen, self.batch = prop, kernel, gen, batch
        if prop.col is None:
            return
        self.prefix = prop.col.cumsum(-1)  # [*b, C, cols], float64
        flat = self.prefix.reshape(-1, kernel.cols)
        totals = flat[:, -1]
        offsets = torch.cumsum(totals, 0) - totals
        # One increasing sequence for all (batch, component) blocks, so one searchsorted serves every sample.
        self.global_cdf = (flat + offsets[:, None]).reshape(-1)
        self.offsets = offsets.reshape(prop.col.shape[:-1])  # [*b, C]

    def sample(self, i0: int, i1: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        prop, k = self.prop, self.kernel
        n = support_sizes(k, i0, i1, self.gen.device)  # [I]
        if prop.col is None:
            shape = (*self.batch, i1 - i0, m)
            u = torch.rand(shape, generator=self.gen, dtype=torch.float64, device=n.device)
            idx = (u * n[:, None]).long().clamp(max=k.cols - 1)
            return idx, (-torch.log(n.double()))[:, None].expand(shape)
        c = prop.col.shape[-2]
        if prop.group:
            return self._sample_grouped(i0, i1, m, n)
        sn = self.prefix[..., n - 1].transpose(-2, -1)  # [*b, I, C]: component mass inside each row's support
        a = prop.row[..., i0:i1, :] if prop.row is not None else torch.ones_like(sn)
        mass = a * sn
        tot = mass.sum(-1)  # [*b, I]
        alpha = torch.where(tot > 0, torch.full_like(tot, prop.alpha), torch.ones_like(tot))
        if c == 1:
            comp = torch.zeros(*tot.shape, m, dtype=torch.long, device=n.device)
        else:
            probs = torch.where(tot[..., None] > 0, mass, torch.ones_like(mass)).reshape(-1, c)
            comp = torch.multinomial(probs, m, replacement=True, generator=self.gen).reshape(*tot.shape, m)
        u = torch.rand(*tot.shape, m, generator=self.gen, dtype=torch.float64, device=n.device)
        target = torch.gather(self.offsets[..., None, :].expand(*tot.shape, c), -1, comp)
        target = target + u * torch.gather(sn, -1, comp)
        pos = torch.searchsorted(self.global_cdf, target.reshape(-1), right=True).reshape(target.shape)
        j_mix = pos - self._block_index(comp) * k.cols
        uni = torch.rand(*tot.shape, m, generator=self.gen, dtype=torch.float64, device=n.device)
        j_uni = (uni * n[:, None]).long()
        pick_uniform = torch.rand(*tot.shape, m, generator=self.gen, device=n.device) < alpha[..., None]
        idx = torch.where(pick_uniform, j_uni, j_mix)
        idx = torch.minimum(idx.clamp(min=0), (n - 1)[:, None])
        dens = (gather_rows(prop.col.transpose(-2, -1), idx) * a[..., None, :]).sum(-1)  # [*b, I, M]
        q = (1 - alpha[..., None]) * dens / tot.clamp_min(1e-300)[..., None] + alpha[..., None] / n[:, None]
        return idx, q.log()

    def _sample_grouped(self, i0: int, i1: int, m: int, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row i draws from its group's component only (``probe``): no component draw, one gather per sample."""
        prop, k = self.prop, self.kernel
        comp = torch.arange(i0, i1, device=n.device) // prop.group  # [I]
        sn = self.prefix[..., comp, n - 1]  # [*b, I]: the component's mass inside each row's support
        alpha = torch.where(sn > 0, torch.full_like(sn, prop.alpha), torch.ones_like(sn))
        u = torch.rand(*sn.shape, m, generator=self.gen, dtype=torch.float64, device=n.device)
        lead = sn.shape[:-1]
        c = prop.col.shape[-2]
        block = torch.arange(math.prod(lead), device=n.device).reshape(*lead, 1) * c + comp  # [*b, I]
        target = self.offsets.reshape(-1)[block][..., None] + u * sn[..., None]
        pos = torch.searchsorted(self.global_cdf, target.reshape(-1), right=True).reshape(target.shape)
        j_mix = pos - block[..., None] * k.cols
        uni = torch.rand(*sn.shape, m, generator=self.gen, dtype=torch.float64, device=n.device)
        j_uni = (uni * n[:, None]).long()
        pick_uniform = torch.rand(*sn.shape, m, generator=self.gen, device=n.device) < alpha[..., None]
        idx = torch.minimum(torch.where(pick_uniform, j_uni, j_mix).clamp(min=0), (n - 1)[:, None])
        dens = prop.col.reshape(-1)[block[..., None] * k.cols + idx]
        q = (1 - alpha[..., None]) * dens / sn.clamp_min(1e-300)[..., None] + alpha[..., None] / n[:, None]
        return idx, q.log()

    def _block_index(self, comp: torch.Tensor) -> torch.Tensor:
        """Flat (batch, component) block number of each sampled component."""
        c = self.prop.col.shape[-2]
        lead = comp.shape[:-2]
        base = torch.arange(math.prod(lead), device=comp.device).reshape(*lead, 1, 1) * c
        return base + comp


def shared_distribution(prop: Proposal, kernel: PairKernel, batch: tuple[int, ...], device) -> torch.Tensor:
    """[*b, cols] unnormalised q(j) used by every row; the causal tilt 1/(j+1) gives every prefix a share."""
    cols = kernel.cols
    uniform = torch.full((*batch, cols), 1.0 / cols, dtype=torch.float64, device=device)
    if prop.col is None:
        w = uniform
    else:
        totals = prop.col.sum(-1)  # [*b, C]
        if prop.row is None:
            abar = torch.ones_like(totals)
        else:  # column mass of the row-normalised approximate kernel
            abar = (prop.row / (prop.row * totals[..., None, :]).sum(-1, keepdim=True).clamp_min(1e-300)).sum(-2)
        mix = (abar[..., :, None] * prop.col).sum(-2)
        mix = mix / mix.sum(-1, keepdim=True).clamp_min(1e-300)
        w = (1 - prop.alpha) * mix + prop.alpha * uniform
    if kernel.causal:
        w = w / torch.arange(1, cols + 1, dtype=torch.float64, device=device)
    return w / w.sum(-1, keepdim=True)


def draw(kernel: PairKernel, v: torch.Tensor, opts: MonteCarloOptions):
    """The sampling step, block of rows by block of rows: yields (i0, i1, idx, logq) for rows [i0, i1) with
    ``per_row`` idx, logq [*b, I, M]; ``shared`` idx [*b, M] and logq [*b, 1, M], the same for every block. logq is
    in v's dtype and keeps its autograd graph (a data-dependent proposal depends on k and v). Blocks must be taken in
    order: the generator is consumed as they are drawn."""
    batch = tuple(v.shape[:-2])
    gen = torch.Generator(device=v.device).manual_seed(int(opts.seed))
    prop = build_proposal(kernel, v, opts)
    m, lq = opts.samples, kernel.rows
    block = opts.block or max(1, min(lq, 2**24 // max(1, math.prod(batch) * m * v.shape[-1])))
    if opts.mode == "shared":
        dist = shared_distribution(prop, kernel, batch, v.device)
        idx = torch.multinomial(dist.reshape(-1, kernel.cols), m, replacement=True, generator=gen)
        idx = idx.reshape(*batch, m)
        logq = torch.gather(dist, -1, idx).log().to(v.dtype)[..., None, :]
        for i0 in range(0, lq, block):
            yield i0, min(i0 + block, lq), idx, logq
        return
    sampler = PerRowSampler(prop, kernel, gen, batch)
    for i0 in range(0, lq, block):
        i1 = min(i0 + block, lq)
        idx_rows, logq_rows = sampler.sample(i0, i1, m)
        yield i0, i1, idx_rows.expand(*batch, i1 - i0, m), logq_rows.to(v.dtype).expand(*batch, i1 - i0, m)


def montecarlo_transform(
    kernel: PairKernel, v: torch.Tensor, opts: MonteCarloOptions
) -> tuple[torch.Tensor, ErrorEstimate]:
    """The estimate of y and its self-estimated error (see the module docstring for the estimators)."""
    batch = tuple(v.shape[:-2])
    m, lq = opts.samples, kernel.rows
    out = v.new_empty(*batch, lq, v.shape[-1])
    var_sum = torch.zeros((), dtype=torch.float64, device=v.device)
    fallback = 0
    vv = None
    v2 = (v * v).sum(-1, keepdim=True)  # [*b, L, 1]
    for i0, i1, idx, logq in draw(kernel, v, opts):
        vals = kernel.at(slice(i0, i1), idx)
        if opts.mode == "per_row":
            norms = gather_rows(v2, idx)[..., 0]  # ‖v_j‖² of the samples, gathered, not recomputed
            y, var, bad = _estimate(kernel, vals, logq, gather_rows(v, idx), None, m, norms)
        else:
            vv = gather_rows(v, idx) if vv is None else vv  # [*b, M, Dv], gathered once
            valid = None
            if kernel.causal:
                valid = idx[..., None, :] <= torch.arange(i0, i1, device=v.device)[:, None]
            y, var, bad = _estimate(kernel, vals, logq, vv, valid, m)
        if bad is not None and torch.compiler.is_exporting():  # a graph cannot branch on data: every row checked
            y = _exact_rows(kernel, v, y, bad, i0, every=True)
        elif bad is not None and bool(bad.any()):
            fallback += int(bad.sum())
            y = _exact_rows(kernel, v, y, bad, i0)
            var = var.masked_fill(bad, 0.0)
        out[..., i0:i1, :] = y
        var_sum += var.detach().double().sum()  # the error estimate is a report: no autograd graph
    if torch.compiler.is_exporting():  # an exported graph computes the output only; the estimate is a report
        return out, None
    return out, estimate_error(var_sum, out, m, fallback, check_rows(kernel, v, out, opts))


def estimate_error(var_sum: torch.Tensor, out: torch.Tensor, samples: int, fallback: int, checks=None) -> ErrorEstimate:
    """The ``ErrorEstimate`` of an output from its summed per-row variances and, where given, ``checks``: per check
    row ‖ŷ_r - y_r‖² divided by its inclusion probability (see ``combine``)."""
    sampling = relative(math.sqrt(float(var_sum.detach())), out)
    rel, parts = combine(sampling, checks, out)
    norm = float(out.detach().double().norm())
    return ErrorEstimate(abs=rel * norm, rel=rel, samples=samples, fallback_rows=fallback, parts=parts)


def combine(sampling: float, checks: torch.Tensor | None, out: torch.Tensor) -> tuple[float, dict[str, float] | None]:
    """rel = max(sampling, check_low): the variance alone misses the bias of a proposal that never finds a row's
    peak, which exact check rows see. ``checks`` sum to an unbiased estimate of ‖ŷ - y‖²; check_low is that sum less
    half its standard error (so a few unlucky check rows do not dominate), over ‖ŷ‖²."""
    if checks is None or checks.numel() == 0:
        return sampling, None
    norm2 = float(out.detach().double().pow(2).sum())
    total = float(checks.sum())
    n = checks.numel()
    se = math.sqrt(float((checks - checks.mean()).pow(2).sum()) * n / max(n - 1, 1))
    check = math.sqrt(total / norm2) if norm2 > 0 else 0.0
    low = math.sqrt(max(total - 0.5 * se, 0.0) / norm2) if norm2 > 0 else 0.0
    return max(sampling, low), {"sampling": sampling, "check": check, "check_low": low}


@torch.no_grad()
def check_rows(kernel: PairKernel, v: torch.Tensor, out: torch.Tensor, opts: MonteCarloOptions) -> torch.Tensor | None:
    """``opts.checks`` rows drawn uniformly (seeded; the same rows in every (batch, head)) computed exactly: per row
    and batch element ‖ŷ_r - y_r‖² · rows / checks, whose sum estimates the squared error of the whole output."""
    c = min(int(opts.checks), kernel.rows)
    if c == 0:
        return None
    gen = torch.Generator().manual_seed(int(opts.seed) + 3)
    rows = torch.randperm(kernel.rows, generator=gen)[:c].sort().values.to(v.device)
    vals = kernel.block(rows, slice(None)).double()
    keep = None
    if kernel.causal:
        keep = torch.arange(kernel.cols, device=v.device)[None, :] <= rows[:, None]
    if kernel.normalized:
        if keep is not None:
            vals = vals.masked_fill(~keep, float("-inf"))
        w = torch.softmax(vals, -1).nan_to_num(0.0)
    else:
        w = vals if keep is None else vals * keep
    exact = torch.matmul(w, v.double())
    err = (out[..., rows, :].detach().double() - exact).pow(2).sum(-1)
    return (err * (kernel.rows / c)).flatten()


def relative(err: float, estimate: torch.Tensor) -> float:
    """err / ‖y‖, with ‖y‖² estimated without bias as ‖ŷ‖² - err² (‖ŷ‖ alone is inflated by the very noise that
    ``err`` measures, which caps a naive ratio near 1); floored at ‖ŷ‖²/100, so an estimate that is mostly noise
    reads as at most 10·err/‖ŷ‖."""
    sq = float(estimate.detach().double().pow(2).sum())
    return err / math.sqrt(max(sq - err * err, 0.01 * sq, 1e-300))


def _estimate(kernel, vals, logq, vv, valid, m, sq_norms=None):
    """Per-row estimate, per-row variance (summed over features) and the rows with no usable sample."""
    per_row = vv.dim() == vals.dim() + 1
    contract = (lambda w, x: torch.matmul(w[..., None, :], x)[..., 0, :]) if per_row else torch.matmul
    if sq_norms is None:
        sq_norms = (vv * vv).sum(-1)
    if not kernel.normalized:
        u = vals * torch.exp(-logq)
        if valid is not None:
            u = u.masked_fill(~valid, 0.0)
        y = contract(u, vv) / m
        sumsq = _rowdot(u * u, sq_norms, per_row)
        var = (sumsq - m * (y * y).sum(-1)).clamp_min(0.0) / (m * (m - 1))
        return y, var, None
    lw = vals - logq
    if valid is not None:
        lw = lw.masked_fill(~valid, float("-inf"))
    mx = lw.amax(-1, keepdim=True)
    bad = torch.isinf(mx[..., 0])
    w = torch.exp(lw - torch.where(torch.isinf(mx), torch.zeros_like(mx), mx))
    total = w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    w = w / total
    y = contract(w, vv)
    w2 = w * w
    # Σ w² ‖v - ŷ‖² expanded, so shared samples never need an [I, M, d] temporary.
    var = _rowdot(w2, sq_norms, per_row) - 2 * (contract(w2, vv) * y).sum(-1) + w2.sum(-1) * (y * y).sum(-1)
    return y, var.clamp_min(0.0), bad


def _rowdot(w: torch.Tensor, x: torch.Tensor, per_row: bool) -> torch.Tensor:
    return (w * x).sum(-1) if per_row else torch.matmul(w, x[..., None])[..., 0]


def _exact_rows(kernel: PairKernel, v: torch.Tensor, y: torch.Tensor, bad: torch.Tensor, i0: int, every=False):
    """Replace the rows flagged in ``bad`` ([*b, I]) by their exact value (computing ``every`` row of the block when
    the flagged ones cannot be selected: an exported graph)."""
    if every:
        rows = torch.arange(bad.shape[-1], device=v.device)
    else:
        rows = torch.nonzero(bad.reshape(-1, bad.shape[-1]).any(0)).flatten()
    logits = kernel.block(rows + i0, slice(None))
    if kernel.causal:
        keep = torch.arange(kernel.cols, device=v.device)[None, :] <= (rows + i0)[:, None]
        logits = logits.masked_fill(~keep, float("-inf"))
    p = torch.softmax(logits, dim=-1).masked_fill(torch.isneginf(logits).all(-1, keepdim=True), 0.0)
    exact = torch.matmul(p, v)  # a row that admits no column at all attends to nothing: 0, as SDPA returns
    if every:
        return torch.where(bad[..., None], exact, y)
    y = y.clone()
    sel = y[..., rows, :]
    y[..., rows, :] = torch.where(bad[..., rows, None], exact, sel)
    return y


def attention_montecarlo(q, k, v, mask=None, *, scale, causal, return_weights, layer="", return_error=False, **options):
    """Softmax attention by importance sampling; with ``return_error`` also its ``ErrorEstimate``."""
    if return_weights:
        raise ItnetError("the montecarlo lowering cannot return attention weights; use dense", layer=layer or None)
    opts = MonteCarloOptions.make(layer, **options)
    kernel = DotExpKernel(q, k, mask, scale=scale, causal=causal, layer=layer)
    out, est = montecarlo_transform(kernel, expand_kv(q, v), opts)
    if est is not None:
        report_error(layer, est)
    return (out, est) if return_error else out


OPTIONS = tuple(f.name for f in fields(MonteCarloOptions))


@register("dot_exp", "montecarlo")
def _(node: Node, opts: object):
    a = node.attrs
    assert isinstance(a, DotExpAttrs)
    static = {"scale": a.scale, "causal": a.support == "causal", "return_weights": a.return_weights}
    return attention_montecarlo, {**static, "layer": node.name}
