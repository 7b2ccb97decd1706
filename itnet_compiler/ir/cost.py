"""Cost model of each (family, lowering): FLOPs, bytes moved and an a-priori error, as sympy expressions in the
program's symbolic sizes.

A rule is registered per (family, lowering) with ``@cost_rule``; it reads the node's types and attributes and the
lowering's options (defaults as the torch backend's) and returns a ``Cost``, or None where the lowering does not
apply to that node (``fused`` cannot return attention weights). Rules that have free options (samples, rank) also
say, through ``fit``, the cheapest options whose a-priori error meets a budget; ``passes/choose_lowering.py`` ranks
the results by roofline time, max(FLOPs / peak FLOP/s, bytes / peak bytes/s), against ``Ceilings``.

Error models (relative Frobenius error of the layer's output, before any measurement):
- exact lowerings: 0 (``fft``: round-off only).
- ``montecarlo`` over the T taps of a convolution: sqrt((T - 1) / M), the error of sampling M of T terms of equal
  size and incoherent signs (the estimator's variance is (T·Σ‖z_t‖² - ‖y‖²)/M); with the weight at hand and the
  norm proposal, T becomes the effective tap count (Σ‖W_t‖)² / Σ‖W_t‖².
- ``montecarlo`` of attention: sqrt(L_k / (e^H·M)) with H = ``ATTENTION_ENTROPY`` nats: M uniform-proposal samples
  land ~M·e^H/L_k times on a row's e^H effective columns (trained models have H ≤ 3; measured errors of random
  peaked attention sit near this).
- ``lowrank`` of a convolution by ``svd``: the weight's own truncation error sqrt(Σ_{i>r} σ_i² / Σ σ_i²), exact for
  white inputs (needs the weight tensor; unknown without it). Attention factorisations and ``cp``/``spatial``/
  ``learned``: unknown (∞) — only the tuner, which measures, can choose them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import sympy
import torch

from .core import Node
from .families import DotExpAttrs, StationaryAttrs, parse_lowering
from .types import TensorType, numel

ATTENTION_ENTROPY = 3.0
UNKNOWN = sympy.oo

TensorLookup = Callable[[str], torch.Tensor | None]  # role -> the constant tensor behind it, if the program has one


@dataclass(frozen=True)
class Cost:
    flops: sympy.Expr
    bytes: sympy.Expr
    error: sympy.Expr  # a-priori relative error; 0 exact, oo unknown

    @property
    def exact(self) -> bool:
        return self.error == 0


@dataclass(frozen=True)
class Ceilings:
    """Peak rates of the target; defaults are a 2-core CPU's order of magnitude (measure and pass real ones)."""

    flops_per_s: float = 5e10
    bytes_per_s: float = 1e10

    def seconds(self, cost: Cost, sizes: Mapping[str, int]) -> float:
        return max(evaluate(cost.flops, sizes) / self.flops_per_s, evaluate(cost.bytes, sizes) / self.bytes_per_s)


@dataclass(frozen=True)
class CostRule:
    cost: Callable[[Node, dict[str, object], TensorLookup | None], Cost | None]
    # Cheapest options meeting an error budget at the given sizes, or None when none does (or none can be known).
    fit: Callable[[Node, float, Mapping[str, int], TensorLookup | None], dict[str, object] | None] | None = None


RULES: dict[tuple[str, str], CostRule] = {}


def cost_rule(family: str, lowering: str, fit=None):
    def deco(fn):
        RULES[(family, lowering)] = CostRule(fn, fit)
        return fn

    return deco


def cost_of(node: Node, spec: str | None = None, tensors: TensorLookup | None = None) -> Cost | None:
    """The cost of ``node`` under ``spec`` (default: its own lowering); None if no rule applies."""
    name, opts = parse_lowering(spec if spec is not None else node.attrs.lowering)
    rule = RULES.get((node.family, name))
    return None if rule is None else rule.cost(node, opts, tensors)


def evaluate(expr: sympy.Expr, sizes: Mapping[str, int]) -> float:
    """A size expression at concrete sizes (by symbol name); inf when it is unknown or still symbolic."""
    expr = sympy.sympify(expr)
    val = expr.subs({s: sizes[s.name] for s in expr.free_symbols if s.name in sizes})
    return float(val) if val.is_number else math.inf


def _itemsize(t: TensorType) -> int:
    return t.dtype.itemsize


def _bytes(t: TensorType) -> sympy.Expr:
    return numel(t) * _itemsize(t)


def _role(node: Node, role: str) -> TensorType | None:
    v = node.kwargs.get(role)
    return v.type if v is not None and isinstance(getattr(v, "type", None), TensorType) else None


def _out(node: Node) -> TensorType:
    t = node.outputs[0].type
    assert isinstance(t, TensorType)
    return t


# ---------------------------------------------------------------------------------------------- dot_exp


@dataclass(frozen=True)
class _Attn:
    bh: sympy.Expr
    lq: sympy.Expr
    lk: sympy.Expr
    d: sympy.Expr
    dv: sympy.Expr
    io: sympy.Expr  # bytes of q, k, v, mask and the output
    e: int
    causal: bool
    keep: sympy.Expr  # the share of (i, j) pairs the support admits: 1, 1/2 (causal), exact count for window(r)


def _attn(node: Node) -> _Attn:
    a = node.attrs
    assert isinstance(a, DotExpAttrs)
    q, k, v = _role(node, "q"), _role(node, "k"), _role(node, "v")
    assert q is not None and k is not None and v is not None
    io = _bytes(q) + _bytes(k) + _bytes(v) + _bytes(_out(node))
    mask = _role(node, "mask")
    if mask is not None:
        io += _bytes(mask)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    keep = a.window_pairs(lq) / (lq * lk) if a.window else (sympy.Rational(1, 2) if a.causal else sympy.Integer(1))
    return _Attn(b * h, lq, lk, d, v.shape[3], io, _itemsize(q), a.causal, keep)


def _softmax_flops(s: _Attn) -> sympy.Expr:
    return 2 * s.bh * s.lq * s.lk * (s.d + s.dv) + 5 * s.bh * s.lq * s.lk


@cost_rule("dot_exp", "dense")
def _(node, opts, tensors):
    s = _attn(node)
    return Cost(_softmax_flops(s), s.io + 4 * s.e * s.bh * s.lq * s.lk, sympy.Integer(0))


@cost_rule("dot_exp", "library")
def _(node, opts, tensors):
    s = _attn(node)
    if node.attrs.return_weights:
        return Cost(_softmax_flops(s), s.io + 4 * s.e * s.bh * s.lq * s.lk, sympy.Integer(0))
    if node.attrs.window:  # SDPA has no window: it gets an N² bool mask and computes every pair
        return Cost(_softmax_flops(s), s.io + s.lq * s.lk, sympy.Integer(0))
    flops = _softmax_flops(s) * s.keep
    return Cost(flops, s.io, sympy.Integer(0))


@cost_rule("dot_exp", "fused")
def _(node, opts, tensors):
    if node.attrs.return_weights:
        return None
    s = _attn(node)
    block_q = int(opts.get("block_q", 256))
    flops = _softmax_flops(s) * s.keep
    rereads = (s.lq / block_q + 1) * s.e * s.bh * s.lk * (s.d + s.dv)  # k and v once per query tile
    return Cost(flops, s.io + rereads, sympy.Integer(0))


def _mc_attention_error(s: _Attn, samples: sympy.Expr) -> sympy.Expr:
    return sympy.sqrt(s.lk / (sympy.exp(ATTENTION_ENTROPY) * samples))


def _fit_mc_attention(node, budget, sizes, tensors):
    if node.attrs.return_weights or budget <= 0:
        return None
    s = _attn(node)
    lk = evaluate(s.lk, sizes)
    m = math.ceil(lk / (math.exp(ATTENTION_ENTROPY) * budget**2))
    return {"samples": max(m, 16)} if m < lk else None  # as many samples as columns: exact is cheaper


@cost_rule("dot_exp", "montecarlo", fit=_fit_mc_attention)
def _(node, opts, tensors):
    if node.attrs.return_weights:
        return None
    s = _attn(node)
    m = sympy.Integer(int(opts.get("samples", 64)))
    rank = int(opts.get("rank", 16))
    rows = s.bh * s.lq * m
    proposal = str(opts.get("proposal", "norm"))
    setup = {"uniform": 0, "norm": 2 * s.bh * s.lk * (s.d + s.dv), "lowrank": 2 * s.bh * (s.lq + s.lk) * rank * s.d}
    if opts.get("mode", "per_row") == "shared":
        flops = rows * (2 * s.d + 4 * s.dv + 8) + setup[proposal]
        moved = s.io + s.e * (rows + s.bh * m * (s.d + s.dv))
    else:  # a gather of k and v per sample, and an inverse-CDF search over L_k
        search = sympy.log(s.lk, 2) + (2 * rank if proposal == "lowrank" else 0)
        flops = rows * (2 * s.d + 4 * s.dv + 8 + search) + setup[proposal]
        moved = s.io + rows * (s.e * (s.d + s.dv) + 8)
    return Cost(flops, moved, _mc_attention_error(s, m))


@cost_rule("dot_exp", "lowrank")
def _(node, opts, tensors):
    if node.attrs.return_weights:
        return None
    s = _attn(node)
    r = sympy.Integer(int(opts.get("rank", 64)))
    features = 2 * s.bh * (s.lq + s.lk) * r * s.d + 2 * s.bh * (s.lq + s.lk) * r
    apply = 2 * s.bh * s.lk * r * (s.dv + 1) + 2 * s.bh * s.lq * r * (s.dv + 1)
    if opts.get("method", "favor") == "nystrom":
        features += 10 * s.bh * r**3
    if s.causal:
        apply += 2 * s.bh * s.lq * int(opts.get("chunk", 256)) * (r + s.dv)
    return Cost(features + apply, s.io + s.e * s.bh * (s.lq + s.lk) * r, UNKNOWN)


# ---------------------------------------------------------------------------------------------- stationary


@dataclass(frozen=True)
class _Conv:
    n: sympy.Expr
    cin: sympy.Expr
    cout: sympy.Expr
    taps: int
    groups: int
    points: sympy.Expr  # output points per image
    in_points: sympy.Expr  # input points per image, after padding (and upsampling when transposed)
    io: sympy.Expr
    e: int
    direct: sympy.Expr  # FLOPs of the direct convolution


def _conv(node: Node) -> _Conv:
    a = node.attrs
    assert isinstance(a, StationaryAttrs)
    x, w = _role(node, "x"), _role(node, "weight")
    assert x is not None and w is not None
    out = _out(node)
    k = w.shape[2:]
    taps = math.prod(int(t) for t in k)
    io = _bytes(x) + _bytes(w) + _bytes(out)
    if a.transposed:
        ins = [
            (n - 1) * s + 1 + 2 * (d * (kk - 1)) - 2 * p[0] + op
            for n, s, d, kk, p, op in zip(
                x.shape[2:], a.stride, a.dilation, k, a.padding, a.output_padding, strict=True
            )
        ]
    else:
        ins = [n + p[0] + p[1] for n, p in zip(x.shape[2:], a.padding, strict=True)]
    return _Conv(
        n=x.shape[0],
        cin=x.shape[1],
        cout=out.shape[1],
        taps=taps,
        groups=a.groups,
        points=sympy.Mul(*out.shape[2:]),
        in_points=sympy.Mul(*ins),
        io=io,
        e=_itemsize(x),
        direct=2 * numel(out) * (x.shape[1] / a.groups) * taps,
    )


@cost_rule("stationary", "library")
def _(node, opts, tensors):
    c = _conv(node)
    return Cost(c.direct, c.io, sympy.Integer(0))


@cost_rule("stationary", "dense")
def _(node, opts, tensors):
    c = _conv(node)
    im2col = c.e * c.n * c.cin * c.taps * c.points
    return Cost(c.direct, c.io + 2 * im2col, sympy.Integer(0))


@cost_rule("stationary", "fused")
def _(node, opts, tensors):
    c = _conv(node)
    return Cost(c.direct, c.io + 2 * c.e * c.n * c.cin * c.in_points, sympy.Integer(0))


@cost_rule("stationary", "fft")
def _(node, opts, tensors):
    c = _conv(node)
    q = c.in_points
    transforms = c.n * c.cin + c.cout * c.cin / c.groups + c.n * c.cout
    flops = 5 * q * sympy.log(q, 2) * transforms + 8 * c.n * c.cout * (c.cin / c.groups) * q / 2
    spectra = 2 * c.e * transforms * q  # complex half spectra: q/2 bins of 2 reals each, written and read
    return Cost(flops, c.io + spectra, sympy.Integer(0))


def effective_taps(weight: torch.Tensor) -> float:
    """(Σ_t ‖W_t‖)² / Σ_t ‖W_t‖²: T for a flat kernel, far fewer for a decaying one (a long conv, an S4 kernel)."""
    norms = weight.detach().double().flatten(0, 1).norm(dim=0).flatten()
    return float(norms.sum() ** 2 / norms.pow(2).sum().clamp_min(1e-300))


def _mc_conv_error(c: _Conv, samples: int, tensors: TensorLookup | None) -> tuple[sympy.Expr, str]:
    """sqrt((T_eff - 1)/M) with the norm proposal when the weight is known (q(t) ∝ ‖W_t‖ for stationary inputs),
    else sqrt((T - 1)/M) with the uniform one."""
    w = tensors("weight") if tensors is not None else None
    if w is None:
        return sympy.sqrt(sympy.Integer(c.taps - 1) / samples), "uniform"
    return sympy.Float(math.sqrt(max(effective_taps(w) - 1.0, 0.0) / samples)), "norm"


def _fit_mc_conv(node, budget, sizes, tensors):
    if budget <= 0:
        return None
    c = _conv(node)
    unit, proposal = _mc_conv_error(c, 1, tensors)
    m = max(2, math.ceil(float(unit) ** 2 / budget**2))
    return {"samples": m, "proposal": proposal} if m < c.taps else None


@cost_rule("stationary", "montecarlo", fit=_fit_mc_conv)
def _(node, opts, tensors):
    c = _conv(node)
    m = int(opts.get("samples", 64))
    distinct = min(m, c.taps)
    per_tap = 2 * c.n * c.points * c.cout * c.cin / c.groups
    flops = per_tap * (m if opts.get("mode", "per_row") == "per_row" else distinct)
    moved = c.io + c.e * c.n * c.cin * c.points * distinct
    error, proposal = _mc_conv_error(c, m, tensors)
    if str(opts.get("proposal", "norm")) != proposal and proposal == "norm":
        error = sympy.sqrt(sympy.Integer(c.taps - 1) / m)  # the weight-aware bound holds for the norm proposal only
    return Cost(flops, moved, error)


def svd_error(weight: torch.Tensor, groups: int, transposed: bool) -> list[float]:
    """Relative truncation error of the channel SVD at rank r = 1, 2, ... (the worst group), from the spectrum."""
    w = weight
    if transposed:  # [C_in, C_out/g, *k] -> the direct form's [C_out, C_in/g, *k] up to a flip
        cin, coutg = w.shape[:2]
        w = w.reshape(groups, cin // groups, coutg, -1).transpose(1, 2).reshape(groups * coutg, cin // groups, -1)
    mats = w.reshape(groups, w.shape[0] // groups, -1).double()
    s2 = torch.linalg.svdvals(mats).pow(2)  # [g, min]
    tail = s2.flip(-1).cumsum(-1).flip(-1)  # Σ_{i>=r} σ²
    rel = (tail / s2.sum(-1, keepdim=True).clamp_min(1e-300)).sqrt()
    worst = rel.amax(0).tolist()
    return worst[1:] + [0.0]  # rank r keeps r values: its error is the tail from index r


def _fit_svd(node, budget, sizes, tensors):
    if budget <= 0 or tensors is None:
        return None
    w = tensors("weight")
    if w is None:
        return None
    a = node.attrs
    errs = svd_error(w, a.groups, a.transposed)
    full = len(errs)
    for r, e in enumerate(errs, start=1):
        if e <= budget and r < full:
            return {"method": "svd", "rank": r}
    return None


@cost_rule("stationary", "lowrank", fit=_fit_svd)
def _(node, opts, tensors):
    c = _conv(node)
    a = node.attrs
    r = int(opts.get("rank", 8))
    method = str(opts.get("method", "svd"))
    g = c.groups
    cin_g, cout_g = c.cin / g, c.cout / g
    if method == "cp":
        per_point = g * r * (cin_g + cout_g + sum(int(k) for k in _role(node, "weight").shape[2:]))
    else:
        per_point = g * r * (cin_g * c.taps + cout_g)
    flops = 2 * c.n * c.points * per_point
    moved = c.io + 2 * c.e * c.n * g * r * c.in_points
    error: sympy.Expr = UNKNOWN
    w = tensors("weight") if tensors is not None else None
    if method == "svd" and w is not None:
        errs = svd_error(w, a.groups, a.transposed)
        error = sympy.Float(errs[min(r, len(errs)) - 1])
    return Cost(flops, moved, error)


def cost_table(
    node: Node, sizes: Mapping[str, int], tensors: TensorLookup | None = None, ceilings: Ceilings | None = None
) -> list[dict[str, object]]:
    """One row per lowering with a rule (default options): the expressions and their values at ``sizes``, for
    ``itnet inspect --cost``."""
    ceilings = ceilings or Ceilings()
    rows = []
    for (family, name), rule in RULES.items():
        if family != node.family:
            continue
        cost = rule.cost(node, {}, tensors)
        if cost is None:
            continue
        rows.append(
            {
                "lowering": name,
                "flops": cost.flops,
                "bytes": cost.bytes,
                "error": cost.error,
                "flops_at": evaluate(cost.flops, sizes),
                "bytes_at": evaluate(cost.bytes, sizes),
                "error_at": evaluate(cost.error, sizes),
                "seconds_at": ceilings.seconds(cost, sizes),
            }
        )
    return rows
