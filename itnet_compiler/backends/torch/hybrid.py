"""The ``hybrid`` lowering of ``dot_exp``: the key blocks that hold a query block's mass exactly, the rest sampled.

Spec: ``hybrid:block=64,blocks=16,mass=0.95,samples=64,probes=2,seed=0`` (see ``HybridOptions``).

Per query block I (``block`` rows), in one pass:

1. **Probes.** ``probes`` rows of I, drawn stratified at random, are scored exactly against every key they admit:
   their softmax rows p_r(j) give, per key block J, an estimate of I's mass in J (the probes' mean), and, per
   column, a query-aware proposal for what is not kept (MInference and FlexPrefill score key blocks from a few real
   query rows in the same spirit). Cost: probes/block of the full logits.
2. **Kept blocks.** The diagonal block, the first ``sinks`` key blocks and the ``local`` blocks before the diagonal
   are always kept; then blocks by decreasing probe mass while the mass covered is below ``mass``, at most
   ``blocks`` in all. Kept blocks are computed exactly (causal masking inside the diagonal block).
3. **Sampled remainder.** ``samples`` columns j_m, shared by the rows of I, are drawn with replacement from the
   uncovered columns with q(j) = (1-α)·p̄(j)/Σ p̄ + α/n_u (p̄: the probes' mean row, α = ``defensive``, n_u the
   uncovered count; every weight is bounded by n_u/α). Each enters the softmax with the log-weight -log(M·q(j_m)),
   so Σ_m e^{s_ij_m}/(M q(j_m)) is an unbiased estimate of the uncovered mass Σ_{j∉kept} e^{s_ij} and the same with
   v_j of its value contribution: y_i = (exact kept part + estimated remainder) / (the same with v = 1).

The estimator is thus one softmax over a fixed key set per query block (kept blocks, then samples with additive
log-weights), which torch computes by gathered block products and autograd differentiates; the Triton lowering
runs the same selection through one kernel. Kept blocks are [B·H, nQ, blocks] block ids (-1 unused), samples
[B·H, nQ, M] columns and log-weights (-inf where nothing is uncovered): ``Selection``.

Error estimate (``ErrorEstimate``; what ``module.error_estimates[layer]`` shows), from the same pass:

- ``sampling``: the delta-method variance of the ratio, per row Var ≈ [M Σ_m t_m²‖v_m - y‖² - ‖Σ_m t_m (v_m - y)‖²]
  / (M - 1) with t_m the normalised weight of sample m, summed over rows (it cannot see a mass no sample hit);
- ``check``: ``checks`` rows per query block, drawn uniformly and held out from every choice above, scored exactly
  with the probes (one more row of the same product): their true error, scaled up to all rows (stratified), sees
  what no sample could, a peak the selection missed (random peaked inputs) or the bias of pooled values.

``rel`` is √(sampling² + check²) (conservative: the check rows measure the sampling error too, so it counts twice;
an estimate must not under-report); both parts are reported. Seeded
runs are deterministic: one ``torch.Generator`` on the tensors' device, consumed in query-block order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ...errors import ItnetError
from ...ir.core import Node
from ...ir.families import DotExpAttrs
from ...ir.lowerings.options import HybridOptions
from .pairkernel import expand_kv, logit_bias
from .registry import register
from .runtime import ErrorEstimate, report_error

ELEMENTS = 1 << 22  # most elements of one chunk's logits (probes, or a chunk of query blocks × its key set)


@dataclass(frozen=True)
class Chunk:
    """The selection of query blocks [g0, g1): kept block ids [BH, G, K] (valid where ``ok``), sampled columns
    ``idx`` [BH, G, M] with log-weights ``logw`` (-inf: no sample), the check rows [BH, G, C] (within their block),
    their exact outputs [BH, G, C, Dv] and their importance weights 1/(C·π) [BH, G, C]."""

    g0: int
    g1: int
    kept: torch.Tensor
    ok: torch.Tensor
    idx: torch.Tensor
    logw: torch.Tensor
    check_rows: torch.Tensor
    check_out: torch.Tensor
    check_weight: torch.Tensor


class Problem:
    """q, k, v flattened to [BH, L, D] and padded to whole blocks, with the mask as a gatherable additive bias."""

    def __init__(self, q, k, v, mask, *, scale: float, causal: bool, opts: HybridOptions, layer: str):
        if q.dim() != 4:
            raise ItnetError("hybrid attention takes q, k, v as [batch, heads, length, dim]", layer=layer or None)
        self.layer, self.opts, self.scale, self.causal = layer, opts, float(scale), causal
        k, v = expand_kv(q, k), expand_kv(q, v)
        self.batch = tuple(q.shape[:2])
        self.lq, self.lk, self.d, self.dv = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
        bs = self.bs = opts.block
        self.nq, self.nk = -(-self.lq // bs), -(-self.lk // bs)
        bh = math.prod(self.batch)
        self.q = _pad(q.reshape(bh, self.lq, self.d), self.nq * bs)
        self.k = _pad(k.reshape(bh, self.lk, self.d), self.nk * bs)
        self.v = _pad(v.reshape(bh, self.lk, self.dv), self.nk * bs)
        bias = logit_bias(mask, q.dtype)
        self.bias = None if bias is None else bias.expand(*self.batch, self.lq, self.lk).reshape(bh, self.lq, self.lk)
        self.device = q.device
        counts = (self.lk - torch.arange(self.nk, device=q.device) * bs).clamp(max=bs).to(q.dtype)
        self.counts = counts  # real columns per key block
        self.kbar = self.k.view(bh, self.nk, bs, self.d).sum(2) / counts[:, None]  # mean key per block
        self.vbar = self.v.view(bh, self.nk, bs, self.dv).sum(2) / counts[:, None]  # mean value per block
        self.log_count = counts.log()
        kb = self.k.view(bh, self.nk, bs, self.d)
        live = (torch.arange(bs, device=q.device)[None, :] < counts[:, None])[None, :, :, None]  # [1, nK, bs, 1]
        self.kmax = kb.masked_fill(~live, float("-inf")).amax(2)  # per-channel bounds of each key block
        self.kmin = kb.masked_fill(~live, float("inf")).amin(2)

    def bias_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
        """The mask's bias at rows [..., R] × cols [BH, ..., C] (broadcast), padded pairs -inf; None without a mask."""
        if self.bias is None:
            return None
        bh = torch.arange(self.bias.shape[0], device=self.device).view(-1, *([1] * (cols.dim() - 1)))
        r = rows.clamp(max=self.lq - 1)[..., :, None]
        c = cols.clamp(max=self.lk - 1)[..., None, :]
        return self.bias[bh[..., None], r, c]


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[1] == n else torch.nn.functional.pad(t, (0, 0, 0, n - t.shape[1]))


def _chunk_blocks(p: Problem) -> int:
    """Query blocks per chunk: logits of the probes and of the key sets stay near ``ELEMENTS``."""
    o, bh = p.opts, p.q.shape[0]
    per_block = bh * max((o.probes + o.checks) * p.nk * p.bs, p.bs * (o.blocks * p.bs + o.samples))
    return max(1, min(p.nq, ELEMENTS // max(per_block, 1)))


@torch.no_grad()
def select(p: Problem) -> Iterator[Chunk]:
    """The selection of every query block, chunk by chunk, in order (the generator is consumed as they are made)."""
    o, bs, dev = p.opts, p.bs, p.device
    gen = torch.Generator(device=dev).manual_seed(int(o.seed))
    step = _chunk_blocks(p)
    for g0 in range(0, p.nq, step):
        g1 = min(g0 + step, p.nq)
        g = g1 - g0
        nkc = min(p.nk, g1) if p.causal else p.nk  # key blocks any row of the chunk admits
        kb = torch.arange(nkc, device=dev)
        counts = p.counts[:nkc]
        blocks = torch.arange(g0, g1, device=dev)
        starts = blocks * bs
        n_rows = (p.lq - starts).clamp(max=bs)  # real rows per block
        # 1. probes: stratified rows of each block, scored against every key they admit
        u = torch.rand(g, o.probes, generator=gen, device=dev, dtype=torch.float64)
        strata = (torch.arange(o.probes, device=dev, dtype=torch.float64) + u) / o.probes
        rows = torch.minimum(starts[:, None] + (strata * n_rows[:, None]).long(), (starts + n_rows - 1)[:, None])
        prob = _exact_rows(p, rows.flatten().expand(p.q.shape[0], -1), nkc)  # [BH, G·P, nkc·bs]
        prob = prob.view(-1, g, o.probes, nkc * bs)
        pbar = prob.view(-1, g, o.probes, nkc, bs).mean(2)  # [BH, G, nkc, bs]: the probes' mean row
        # every row against each key block's mean key: Σ_{j∈J} e^{s_ij} ≈ |J|·e^{q_i·k̄_J} (Jensen: from below)
        pooled = torch.matmul(p.q.view(-1, p.nq, bs, p.d)[:, g0:g1] * p.scale, p.kbar[:, None, :nkc].transpose(-2, -1))
        pooled += p.log_count[:nkc]
        if p.causal:
            pooled.masked_fill_(kb > blocks[:, None, None], float("-inf"))
        pooled_rows = torch.softmax(pooled, -1)  # [BH, G, bs, nkc]
        real = (torch.arange(bs, device=dev)[None, :] < n_rows[:, None]).to(pooled.dtype)  # [G, bs]
        pooled = torch.einsum("xgin,gi->xgn", pooled_rows, real) / n_rows[:, None]  # [BH, G, nK]
        mass = 0.5 * (pbar.sum(-1) + pooled)  # [BH, G, nK]
        # 2. kept blocks: the diagonal first (slot 0, the only one causal masking touches), then by priority
        i = blocks[:, None]
        diag_id = i.clamp(max=nkc - 1)
        admissible = (kb[None, :] <= i) if p.causal else torch.ones(g, nkc, dtype=torch.bool, device=dev)
        diagonal = kb[None, :] == diag_id
        forced = (kb[None, :] < o.sinks) | ((kb[None, :] < i) & (kb[None, :] >= i - o.local))
        if not p.causal:
            forced = forced | ((kb[None, :] > i) & (kb[None, :] <= i + o.local))
        forced = forced & admissible & ~diagonal
        prio = torch.where(admissible & ~diagonal, mass + 2.0 * forced, torch.full_like(mass, -1.0))
        top, kept = prio.topk(min(o.blocks, nkc) - 1, dim=-1)
        kmass = torch.gather(mass, -1, kept)
        before = kmass.cumsum(-1) - kmass + torch.gather(mass, -1, diag_id.expand(*mass.shape[:2], 1))
        ok = (top >= 0) & ((top >= 2.0) | (before < o.mass))
        diag = diag_id.expand(*kept.shape[:2], 1)
        kept = torch.cat([diag, kept], -1)
        ok = torch.cat([torch.ones_like(diag, dtype=torch.bool), ok], -1)
        covered = torch.zeros_like(mass, dtype=torch.long).scatter_add_(-1, kept, ok.long()) > 0  # ids may repeat
        # 3. samples from the uncovered blocks: a block by its estimated mass, then a column in it (the probes'
        # mean row, or uniform), each mixed with a `defensive` uniform share
        unc = (admissible & ~covered).to(mass.dtype) * counts  # [BH, G, nkc]: uncovered columns per block
        n_unc = unc.sum(-1, keepdim=True)
        guided = mass * (unc > 0)
        z = guided.sum(-1, keepdim=True)
        uniform = unc / n_unc.clamp(min=1)
        alpha = o.defensive
        q_blk = torch.where(z > 0, (1 - alpha) * guided / z.clamp_min(1e-30) + alpha * uniform, uniform)
        none = n_unc[..., 0] == 0
        draw_from = torch.where(none[..., None], counts.expand_as(q_blk), q_blk)
        blk = torch.multinomial(draw_from.reshape(-1, nkc), o.samples, replacement=True, generator=gen)
        blk = blk.view(*q_blk.shape[:2], o.samples)  # [BH, G, M]
        pj = torch.gather(pbar, 2, blk[..., None].expand(-1, -1, -1, bs))  # [BH, G, M, bs]
        pj_tot = pj.sum(-1)
        count = counts[blk]
        u = torch.rand(*blk.shape, 2, generator=gen, device=dev, dtype=torch.float64)
        by_probe = (u[..., 0] < 1 - alpha) & (pj_tot > 0)
        cdf = pj.cumsum(-1)
        off_p = torch.searchsorted(cdf, (u[..., 1] * pj_tot)[..., None].to(cdf.dtype), right=True)[..., 0]
        off_u = (u[..., 1] * count).long()
        off = torch.where(by_probe, off_p, off_u).clamp(max=bs - 1)
        off = torch.minimum(off, count.long() - 1).clamp(min=0)
        share = torch.where(pj_tot > 0, 1 - alpha, 0.0)
        within = share * torch.gather(pj, -1, off[..., None])[..., 0] / pj_tot.clamp_min(1e-30) + (1 - share) / count
        density = torch.gather(q_blk, -1, blk).double() * within.double()
        logw = (-torch.log(o.samples * density)).masked_fill(none[..., None], float("-inf"))
        # 4. check rows, drawn after every choice (held out from them): per block, C rows from π_r = ½·r_r/Σr + ½/n
        # with r_r the row's pooled uncovered mass (rows at risk are checked more often); weight 1/(C·π_r)
        qrows = p.q.view(-1, p.nq, bs, p.d)[:, g0:g1] * p.scale
        ub = torch.matmul(qrows.clamp(min=0), p.kmax[:, None, :nkc].transpose(-2, -1))
        ub += torch.matmul(qrows.clamp(max=0), p.kmin[:, None, :nkc].transpose(-2, -1))
        ub += p.log_count[:nkc]  # Σ_{j∈J} e^{s_ij} ≤ |J|·e^{ub_iJ} (per-channel bounds, as Quest scores pages)
        ub.masked_fill_(~admissible[None, :, None, :], float("-inf"))
        risk = torch.softmax(ub, -1).mul_((admissible & ~covered).to(ub.dtype)[:, :, None, :]).sum(-1) * real
        pi = 0.5 * risk / risk.sum(-1, keepdim=True).clamp_min(1e-30) + 0.5 * real / n_rows[:, None]
        pi = torch.where(risk.sum(-1, keepdim=True) > 0, pi, real / n_rows[:, None])  # [BH, G, bs]
        local = torch.multinomial(pi.reshape(-1, bs).double(), max(o.checks, 1), replacement=True, generator=gen)
        local = local.view(*pi.shape[:2], -1)  # [BH, G, C]
        weight = 1.0 / (local.shape[-1] * torch.gather(pi, -1, local).double())
        check_rows = starts[None, :, None] + local
        check_out = torch.matmul(_exact_rows(p, check_rows.flatten(1), nkc), p.v[:, : nkc * bs])
        yield Chunk(g0, g1, kept, ok, blk * bs + off, logw, local, check_out.view(*local.shape, p.dv), weight)


def _exact_rows(p: Problem, rows: torch.Tensor, nkc: int) -> torch.Tensor:
    """The exact softmax rows [BH, R, nkc·bs] of query rows [BH, R] over the first nkc key blocks."""
    cols = torch.arange(nkc * p.bs, device=p.device)
    qr = torch.gather(p.q, 1, rows[..., None].expand(-1, -1, p.d))
    s = torch.matmul(qr * p.scale, p.k[:, : nkc * p.bs].transpose(-2, -1))
    b = p.bias_at(rows, cols.expand(s.shape[0], -1))
    if b is not None:
        s += b
    dead = cols >= p.lk
    if p.causal:
        dead = dead | (cols > rows[..., None])
    s.masked_fill_(dead, float("-inf"))
    if b is not None:  # a mask may empty a row: it then attends to nothing
        s.masked_fill_(torch.isneginf(s).all(-1, keepdim=True), 0.0)
        s.masked_fill_(dead, float("-inf"))
    return torch.softmax(s, -1)


def _key_set(p: Problem, c: Chunk):
    """Gathered keys, values, column ids and slot biases of each query block of ``c``: [BH, G, C, *]."""
    bs, bh = p.bs, p.q.shape[0]
    kcols = (c.kept[..., None] * bs + torch.arange(bs, device=p.device)).flatten(-2)  # [BH, G, K·bs]
    colid = torch.cat([kcols, c.idx], -1)
    flat = (colid + torch.arange(bh, device=p.device)[:, None, None] * p.k.shape[1]).flatten()
    kk = p.k.reshape(-1, p.d).index_select(0, flat).view(*colid.shape, p.d)  # row copies: the fastest gather
    if p.opts.values == "pooled":  # a sample stands for its block: v̄_J (the block mean) instead of v_j
        kflat = kcols + torch.arange(bh, device=p.device)[:, None, None] * p.k.shape[1]
        sblk = c.idx // bs + torch.arange(bh, device=p.device)[:, None, None] * p.nk
        kv = p.v.reshape(-1, p.dv).index_select(0, kflat.flatten()).view(*kcols.shape, p.dv)
        sv = p.vbar.reshape(-1, p.dv).index_select(0, sblk.flatten()).view(*c.idx.shape, p.dv)
        vv = torch.cat([kv, sv], 2)
    else:
        vv = p.v.reshape(-1, p.dv).index_select(0, flat).view(*colid.shape, p.dv)
    kept_bias = torch.where(c.ok, 0.0, float("-inf")).repeat_interleave(bs, -1)
    kept_bias = kept_bias.masked_fill(kcols >= p.lk, float("-inf"))
    slot = torch.cat([kept_bias.to(p.q.dtype), c.logw.to(p.q.dtype)], -1)  # [BH, G, C]
    return kk, vv, colid, slot


def attend(p: Problem, c: Chunk, q_rows: torch.Tensor):
    """The estimator on the chunk's query blocks: y [BH, G, bs, Dv], the normalised weights [BH, G, bs, C] and the
    gathered values [BH, G, C, Dv]. Slot 0 holds the diagonal block: causal masking is one [bs, bs] triangle."""
    bs = p.bs
    kk, vv, colid, slot = _key_set(p, c)
    s = torch.matmul(q_rows * p.scale, kk.transpose(-2, -1))
    s += slot[..., None, :]
    b = None
    if p.bias is not None:
        rows = torch.arange(c.g0, c.g1, device=p.device)[:, None] * bs + torch.arange(bs, device=p.device)
        b = p.bias_at(rows, colid)
        s += b
    if p.causal:
        tri = torch.ones(bs, bs, dtype=torch.bool, device=p.device).triu(1)
        s[..., :bs].masked_fill_(tri, float("-inf"))
    if b is None and p.lq % bs == 0 and (p.lk % bs == 0 or not p.causal):
        w = torch.softmax(s, -1)  # every row keeps its own column (or a whole key block): no empty row
    else:  # padded rows, or rows a mask empties: 0, as SDPA returns
        empty = torch.isneginf(s).all(-1, keepdim=True)
        w = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return torch.matmul(w, vv), w, vv


@torch.no_grad()
def sampling_variance(y: torch.Tensor, w: torch.Tensor, vv: torch.Tensor, m: int) -> torch.Tensor:
    """Σ over rows of the delta-method variance of the ratio estimate (see the module docstring); y [.., bs, Dv],
    w the normalised weights of the M sample slots [.., bs, M], vv their values [.., M, Dv]."""
    if m < 2:
        return torch.zeros((), dtype=torch.float64, device=y.device)
    w2 = w * w
    sum_sq = w2 @ (vv * vv).sum(-1)[..., None]
    sum_sq = sum_sq[..., 0] - 2 * ((w2 @ vv) * y).sum(-1) + w2.sum(-1) * (y * y).sum(-1)
    dev = w @ vv - w.sum(-1, keepdim=True) * y
    var = (m * sum_sq - (dev * dev).sum(-1)) / (m - 1)
    return var.clamp_min(0.0).double().sum()


@dataclass
class Tally:
    """The error estimate's sums over chunks."""

    var: float = 0.0
    check_err: list[torch.Tensor] = field(default_factory=list)  # per check row: ‖ŷ_r - y_r‖² / (C·π_r)

    @torch.no_grad()
    def checks(self, c: Chunk, y: torch.Tensor) -> None:
        """y: the estimate on the chunk's query blocks [BH, G, bs, Dv]."""
        y_rows = torch.gather(y, 2, c.check_rows[..., None].expand(-1, -1, -1, y.shape[-1]))
        diff = (y_rows.double() - c.check_out.double()).pow(2).sum(-1)
        self.check_err.append((diff * c.check_weight).flatten())

    def estimate(self, out: torch.Tensor, samples: int) -> ErrorEstimate:
        from .montecarlo import estimate_error

        checks = torch.cat(self.check_err) if self.check_err else None
        return estimate_error(torch.tensor(self.var), out, samples, 0, checks)


def hybrid_transform(p: Problem) -> tuple[torch.Tensor, ErrorEstimate]:
    """y [BH, L_q, Dv] and its error estimate."""
    bs, bh = p.bs, p.q.shape[0]
    parts = []
    tally = Tally()
    qb = p.q.view(bh, p.nq, bs, p.d)
    for c in select(p):
        y, w, vv = attend(p, c, qb[:, c.g0 : c.g1])
        m = c.idx.shape[-1]
        tally.var += float(sampling_variance(y.detach(), w[..., -m:].detach(), vv[..., -m:, :].detach(), m))
        tally.checks(c, y.detach())
        parts.append(y.reshape(bh, -1, p.dv))
    y = torch.cat(parts, 1)[:, : p.lq]
    return y, tally.estimate(y, p.opts.samples)


def attention_hybrid(q, k, v, mask=None, *, scale, causal, return_weights, layer="", return_error=False, **options):
    """Softmax attention by exact kept blocks plus a sampled remainder; with ``return_error`` also its estimate."""
    if return_weights:
        raise ItnetError("the hybrid lowering cannot return attention weights; use dense", layer=layer or None)
    opts = HybridOptions.make(layer, **options)
    p = Problem(q, k, v, mask, scale=scale, causal=causal, opts=opts, layer=layer)
    y, est = hybrid_transform(p)
    out = y.reshape(*p.batch, p.lq, p.dv)
    report_error(layer, est)
    return (out, est) if return_error else out


@register("dot_exp", "hybrid")
def _(node: Node, opts: object):
    a = node.attrs
    assert isinstance(a, DotExpAttrs)
    static = {"scale": a.scale, "causal": a.support == "causal", "return_weights": a.return_weights}
    return attention_hybrid, {**static, "layer": node.name}
