"""Triton lowering of ``mlp`` (the ITNet layer, math and layout in ``ir/mlp.py``): ``fused``, forward and backward.

Rendered from ``templates.MLP_FUSED``. One program per (row tile, batch·head); K is evaluated on chip one hidden unit
at a time (a loop over units, each a [block_m, block_n] tile), so registers and shared memory do not depend on the
hidden width: exact, the same math as the torch ``pair_logits`` (δ = xq − xk formed per pair, cos of the phase per
pair, silu as z·sigmoid(z)). Memory is O(N): the forward keeps the row max and log2 of the row sum (two planes, as
the attention kernels do) when normalised, nothing else; the backward recomputes each tile's logits and then each
unit's activations, and adds the per-point gradients atomically into float32 buffers (float64 for float64 inputs)
of the points' own size, while the kernel's parameters' gradients (sums over all pairs) stay in registers per
program and are summed here. Heads share the hidden layer but are separate programs (the units are recomputed per
head). Tuning values are the fields of ``MlpOptions``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton

from . import loader
from .templates import MLP_FUSED, mlp_holes

GRID_Y = 65535  # the most programs the launch grid's second axis (batch · heads) takes on CUDA
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class MlpOptions:
    block_m: int = 64
    block_n: int = 32
    num_warps: int = 4
    bwd_block_m: int = 32
    bwd_block_n: int = 32
    bwd_num_warps: int = 4

    @staticmethod
    def default(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> MlpOptions:
        """A unit's tile is block_m·block_n values a few times over, whatever the hidden width (see the module)."""
        if device.type != "cuda":  # interpreter: small tiles keep numpy fast
            return MlpOptions(16, 16, 1, 16, 16, 1)
        return MlpOptions(64, 32, 8, 32, 32, 8)

    def with_overrides(self, **kw: object) -> MlpOptions:
        fields = set(vars(self))
        return replace(self, **{k: int(v) for k, v in kw.items() if k in fields and v is not None})  # type: ignore


@dataclass(frozen=True)
class _Config:
    features: tuple[str, ...]
    normalize: bool
    causal: bool
    opts: MlpOptions
    measure: str = "uniform"

    def inv_m(self, m: int) -> float:
        return 1.0 / m if self.measure == "uniform" else 1.0


def kernels():
    return loader.load("mlp_fused", loader.render(MLP_FUSED, mlp_holes("mlp fused (ITNet pair kernel)")))


def _flags(cfg: _Config, coord_dim: int, dtype: torch.dtype, bwd: bool) -> dict[str, object]:
    f = cfg.features
    o = cfg.opts
    out: dict[str, object] = {
        "DX": coord_dim, "HADAMARD": "hadamard" in f, "OFFSET": "offset" in f, "DIST2": "dist2" in f,
        "FOURIER": "fourier" in f, "F64": dtype == torch.float64, "NORMALIZE": cfg.normalize, "CAUSAL": cfg.causal,
        "WEIGHTED": cfg.measure == "importance",
        "PREC": "ieee" if dtype == torch.float64 else loader.dot_precision(dtype),
        "BLOCK_M": o.bwd_block_m if bwd else o.block_m, "BLOCK_N": o.bwd_block_n if bwd else o.block_n,
        "num_warps": o.bwd_num_warps if bwd else o.num_warps,
    }  # fmt: skip
    return out


def _unit_args(a, b, rho, gamma, xq, xk, params) -> list[object]:
    """The UNIT_ARGS of the template: pointers (a, b default to ρ, γ when absent; never read) and strides."""
    w_off, w_dist, omega, beta, alpha = params[:5]
    sq = 0 if xq.shape[0] == 1 else xq.stride(0)
    sk = 0 if xk.shape[0] == 1 else xk.stride(0)
    sr = 0 if rho.shape[0] == 1 else rho.stride(0)  # batch 1: one kernel shared by the batch
    sg = 0 if gamma.shape[0] == 1 else gamma.stride(0)
    pointers = [rho if a is None else a, gamma if b is None else b, rho, gamma, xq, xk, w_off, w_dist, omega, beta]
    strides = [sr, rho.stride(1), sg, gamma.stride(1), sq, xq.stride(1), sk, xk.stride(1)]
    return [*pointers, alpha, *strides]


def _prepare(a, b, rho, gamma, xq, xk, v, mu, params):
    def c(t):
        return None if t is None else t.contiguous()

    return (c(a), c(b), c(rho), c(gamma), c(xq), c(xk), c(v), c(mu), tuple(p.contiguous() for p in params))


def _weights(mu, rho) -> list[object]:
    """MU and its batch stride (ρ, never read, without the importance measure; stride 0 for one shared row)."""
    if mu is None:
        return [rho, 0]
    return [mu, 0 if mu.shape[0] == 1 else mu.stride(0)]


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _Config, a, b, rho, gamma, xq, xk, v, mu, *params):
        a, b, rho, gamma, xq, xk, v, mu, params = _prepare(a, b, rho, gamma, xq, xk, v, mu, params)
        bsz, heads, m, dv = v.shape
        n = rho.shape[1]
        o = torch.empty(bsz, heads, n, dv, dtype=v.dtype, device=v.device)
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        lse = torch.empty(2, bsz * heads, n, dtype=acc, device=v.device)  # row max, log2 of row sum
        flags = _flags(cfg, xq.shape[2], v.dtype, bwd=False)
        grid = (triton.cdiv(n, int(flags["BLOCK_M"])), bsz * heads)
        kernels().mlp_fwd[grid](
            *_unit_args(a, b, rho, gamma, xq, xk, params), v, params[5], params[6], o, lse, *_weights(mu, rho),
            *v.stride()[:3], *o.stride()[:3], heads, n, m, dv, rho.shape[2], cfg.inv_m(m),
            BLOCK_D=max(16, triton.next_power_of_2(dv)), **flags,
        )  # fmt: skip
        ctx.save_for_backward(a, b, rho, gamma, xq, xk, v, mu, o, lse, *params)
        ctx.cfg = cfg
        return o

    @staticmethod
    def backward(ctx, do):
        a, b, rho, gamma, xq, xk, v, mu, o, lse, *params = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        bsz, heads, m, dv = v.shape
        n, hd, dx = rho.shape[1], rho.shape[2], xq.shape[2]
        do = do.contiguous()
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        f = dict(dtype=acc, device=v.device)
        da, dr, rphi = (torch.zeros(bsz, n, hd, **f) for _ in range(3))
        db, dg, cphi = (torch.zeros(bsz, m, hd, **f) for _ in range(3))
        dxq, dxk = torch.zeros(bsz, n, dx, **f), torch.zeros(bsz, m, dx, **f)
        dvb = torch.zeros(bsz, heads, m, dv, **f)
        dmu = torch.zeros(bsz, m, **f) if mu is not None else dvb
        delta = (do.to(acc) * o.to(acc)).sum(-1).reshape(bsz * heads, n).contiguous()
        flags = _flags(cfg, dx, v.dtype, bwd=True)
        tiles = triton.cdiv(n, int(flags["BLOCK_M"]))
        bh_, bx = triton.next_power_of_2(hd), max(2, triton.next_power_of_2(dx))
        pv = torch.zeros(bsz * heads * tiles, 4, bh_, **f)
        pm = torch.zeros(bsz * heads * tiles, 2, bh_, bx, **f)
        kernels().mlp_bwd[(tiles, bsz * heads)](
            *_unit_args(a, b, rho, gamma, xq, xk, params), v, params[5], params[6], do, lse, delta, da, db, dr, dg,
            rphi, cphi, dxq, dxk, dvb, pv, pm, *_weights(mu, rho), dmu, *v.stride()[:3], *do.stride()[:3], heads, n, m,
            dv, hd, cfg.inv_m(m),
            BLOCK_D=max(16, triton.next_power_of_2(dv)), BLOCK_H=bh_, BLOCK_X=bx, **flags,
        )  # fmt: skip
        return (None, *_assemble(ctx, cfg, (da, db, dr, dg, rphi, cphi, dxq, dxk, dvb, dmu, pv, pm), tiles))


def _assemble(ctx, cfg: _Config, bufs, tiles: int) -> tuple:
    """Every input's gradient from the kernel's buffers (None where an input has none or needs none)."""
    a, b, rho, gamma, xq, xk, v, mu, _, _, w_off, w_dist, omega, beta, alpha, w_out, b_out = ctx.saved_tensors
    da, db, dr, dg, rphi, cphi, dxq, dxk, dvb, dmu, pv, pm = bufs
    feats = cfg.features
    hd, dx = rho.shape[2], xq.shape[2]
    bsz, heads = v.shape[:2]
    if "offset" in feats:
        dxq = dxq + dr @ w_off.to(dr.dtype)
        dxk = dxk - dg @ w_off.to(dg.dtype)
    if "fourier" in feats:
        dxq = dxq + rphi @ omega.to(rphi.dtype)
        dxk = dxk - cphi @ omega.to(cphi.dtype)
    sums = pv.sum(0)
    per_head = pv[:, 2:].view(bsz, heads, tiles, 2, -1).sum((0, 2))
    has = {"offset": "offset" in feats, "dist2": "dist2" in feats, "fourier": "fourier" in feats}
    grads = {
        "a": da if a is not None else None, "b": db if b is not None else None, "rho": dr, "gamma": dg,
        "xq": dxq if has["offset"] or has["dist2"] or has["fourier"] else None,
        "xk": dxk if has["offset"] or has["dist2"] or has["fourier"] else None, "v": dvb,
        "mu": None if mu is None else dmu,
        "w_off": pm[:, 0].sum(0)[:hd, :dx] if has["offset"] else None,
        "w_dist": sums[0, :hd] if has["dist2"] else None,
        "omega": pm[:, 1].sum(0)[:hd, :dx] if has["fourier"] else None,
        "beta": rphi.sum((0, 1)) if has["fourier"] else None,
        "alpha": sums[1, :hd] if has["fourier"] else None,
        "w_out": per_head[:, 0, :hd], "b_out": per_head[:, 1, 0],
    }  # fmt: skip
    like = {"a": a, "b": b, "rho": rho, "gamma": gamma, "xq": xq, "xk": xk, "v": v, "mu": mu, "w_off": w_off,
            "w_dist": w_dist, "omega": omega, "beta": beta, "alpha": alpha, "w_out": w_out, "b_out": b_out}  # fmt: skip
    out = []
    for i, (name, g) in enumerate(grads.items()):
        need = ctx.needs_input_grad[i + 1]
        if g is not None and like[name] is not None and g.dim() == like[name].dim() and g.shape != like[name].shape:
            g = g.sum(0, keepdim=True)  # a per-point input of batch 1 (ρ, γ, coordinates, μ), read by every entry
        out.append(g.to(like[name].dtype) if need and g is not None else None)
    return tuple(out)


def supported(a, b, rho, gamma, xq, xk, v, mu, *params, **_: object) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can."""
    if v.dtype not in DTYPES:
        return f"dtype {v.dtype}"
    tensors = [t for t in (a, b, rho, gamma, xq, xk, mu, *params) if t is not None]
    if any(not t.is_floating_point() for t in tensors):
        return "a non-floating-point input"
    if v.dtype == torch.float64 and any(t.dtype != torch.float64 for t in tensors):
        return "float64 values with inputs of another dtype"
    if rho.shape[1] == 0 or gamma.shape[1] == 0:
        return "no output or no input points"
    if v.shape[0] * v.shape[1] > GRID_Y:
        return f"batch × heads above {GRID_Y} (the launch grid's second axis)"
    if v.shape[-1] > 256:
        return "value dim above 256"
    if max(t.numel() for t in (rho, gamma, v)) >= 2**31:
        return "an input of 2³¹ elements or more (the kernels' offsets within a batch are 32-bit)"
    return None


def mlp_fused(a, b, rho, gamma, xq, xk, v, mu, *params, normalize, causal, features, layer="", measure="uniform",
              **overrides):  # fmt: skip
    """The Triton implementation of ``mlp`` with the contract of the torch lowerings (``block_q``/``block_k``, the
    torch tiles, are accepted and ignored: a plan written for torch runs here unchanged)."""
    opts = MlpOptions.default(v.device, v.dtype).with_overrides(**overrides)
    cfg = _Config(tuple(features), bool(normalize), bool(causal), opts, measure)
    return _Fused.apply(cfg, a, b, rho, gamma, xq, xk, v, mu, *params)
