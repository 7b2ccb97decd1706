"""GPU checks and timings of the Triton ``montecarlo`` kernels of ``dot_exp``, run from bench/gpu.py.

``check(g)`` and ``speed(g)`` take ``g``, the namespace of bench/gpu.py (``row``, ``bench``, ``rel``, ``CHECKS``,
``dev``, ``save``). Both backends draw the same samples from one seed, so the references are exact:
- check: output, error estimate and dq, dk, dv against the torch lowering. fp32: the torch lowering in fp32 with
  the same options (norm proposal: its gradient through log q included). fp16/bf16: the torch lowering in float64
  on the same rounded inputs with the uniform proposal, whose samples do not depend on the inputs' precision.
  Both modes, causal and not, bool and additive masks, GQA.
- speed: B2 H8 N4096 d64 M128 bf16, per_row and shared, forward and forward+backward: the kernels alone (samples
  drawn once), the whole lowering (sampling included), the torch lowering, and SDPA (exact attention). GB/s counts
  the gathered bytes (per_row: K and V rows, indices and log q of every (row, sample)).
"""

from __future__ import annotations

import traceback

import torch
import torch.nn.functional as F

from itnet_compiler.backends.torch import montecarlo as TM
from itnet_compiler.backends.torch.pairkernel import DotExpKernel, expand_kv
from itnet_compiler.backends.triton import montecarlo as M

SPEED = (2, 8, 4096, 64, 128)  # batch, heads, length, head dim, samples
CASES = [
    # b, h, h_kv, n, d, causal, mask, mode, samples
    (2, 4, 2, 300, 64, False, None, "per_row", 64),
    (2, 4, 4, 300, 64, True, "bool", "per_row", 48),
    (1, 8, 2, 257, 128, True, "add", "shared", 96),
    (2, 4, 4, 300, 64, False, "bool", "shared", 64),
]


def _inputs(dev, b, h, hkv, n, d, dtype, seed=0):
    gen = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randn(b, x, n, d, generator=gen, device=dev).to(dtype) for x in (h, hkv, hkv)]


def _mask(dev, kind, b, h, n):
    gen = torch.Generator(device=dev).manual_seed(1)
    if kind == "bool":
        m = torch.rand(b, 1, n, n, generator=gen, device=dev) > 0.3
        m[..., 0] = True
        return m
    if kind == "add":
        return torch.randn(b, h, n, n, generator=gen, device=dev)
    return None


def check(g) -> None:
    tols = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for b, h, hkv, n, d, causal, mask_kind, mode, samples in CASES:
            proposal = "norm" if dtype == torch.float32 else "uniform"
            name = f"montecarlo {mode} {'causal' if causal else 'full'} {mask_kind} {dtype} B{b} H{h}/{hkv} N{n} d{d}"
            try:
                ins = _inputs(g.dev, b, h, hkv, n, d, dtype)
                mask = _mask(g.dev, mask_kind, b, h, n)
                if mask is not None and mask.is_floating_point():
                    mask = mask.to(dtype)
                kw = dict(scale=d**-0.5, causal=causal, return_weights=False, return_error=True, samples=samples,
                          mode=mode, proposal=proposal, seed=7)  # fmt: skip
                leaves = [t.clone().requires_grad_() for t in ins]
                y, est = M.montecarlo_attention(*leaves, mask, **kw)
                dy = torch.randn_like(y)
                grads = torch.autograd.grad(y, leaves, dy)
                wide = torch.float32 if dtype == torch.float32 else torch.float64
                ref = [t.detach().to(wide).requires_grad_() for t in ins]
                rmask = mask.to(wide) if mask is not None and mask.is_floating_point() else mask
                y_r, est_r = TM.attention_montecarlo(*ref, rmask, **kw)
                ref_grads = torch.autograd.grad(y_r, ref, dy.to(wide))
                errs = {"y": g.rel(y, y_r), "err_est": abs(est.abs - est_r.abs) / max(est_r.abs, 1e-30)}
                errs.update({n_: g.rel(a, r) for n_, a, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True)})
                worst = max(errs.values())
                ok = worst <= tols[dtype] and est.fallback_rows == est_r.fallback_rows
                c = {"kernel": name, "max_rel_err": worst, "errs": {k: float(f"{v:.3g}") for k, v in errs.items()},
                     "fallback_rows": [est.fallback_rows, est_r.fallback_rows], "ok": ok}  # fmt: skip
            except Exception as e:
                traceback.print_exc()
                c = {"kernel": name, "max_rel_err": float("nan"), "ok": False,
                     "error": f"{type(e).__name__}: {str(e)[:300]}"}  # fmt: skip
            g.CHECKS.append(c)
            print(c, flush=True)
    g.save()


def _timed(g, name, fn, flops=None, bytes_=None, bwd=True, **extra):
    """One forward row and (``bwd``) one forward+backward row (backward work counted as 2x forward)."""
    try:
        out = fn()
        g.row(f"{name} fwd", g.bench(fn), flops=flops, bytes_=bytes_, **extra)
        if bwd:
            dy = torch.randn_like(out)
            fb = (3 * flops) if flops else None
            bb = (3 * bytes_) if bytes_ else None
            g.row(f"{name} fwd+bwd", g.bench(lambda: fn().backward(dy)), flops=fb, bytes_=bb, **extra)
    except Exception as e:
        traceback.print_exc()
        g.row(f"{name} FAILED", float("nan"), error=f"{type(e).__name__}: {str(e)[:200]}")


def speed(g) -> None:
    b, h, n, d, m = SPEED
    dtype = torch.bfloat16
    elt = torch.finfo(dtype).bits // 8
    q, k, v = (t.requires_grad_() for t in _inputs(g.dev, b, h, h, n, d, dtype))
    scale = d**-0.5
    tag = f"B{b} H{h} N{n} d{d} M{m} bf16"
    for mode in ("per_row", "shared"):
        opts = TM.MonteCarloOptions.make(samples=m, mode=mode, proposal="norm", seed=0)
        kw = dict(scale=scale, causal=False, return_weights=False, samples=m, mode=mode, proposal="norm", seed=0)
        flops = 4.0 * b * h * n * m * d  # logits and the weighted sum
        if mode == "per_row":
            gathered = b * h * n * m * (2 * d * elt + 4 + elt)  # K and V rows, int32 index, log q
        else:
            tiles = M.MonteCarloTiles.default(d, q.device)
            gathered = b * h * -(-n // tiles.block_m) * m * (2 * d * elt + 4 + elt)
        with torch.no_grad():
            kernel = DotExpKernel(q, k, None, scale=scale, causal=False)
            idx, logq = M._samples(kernel, expand_kv(q, v), opts)
        bias, bs = M._bias(None, (b, h, n, n), q.device)
        tiles = M.MonteCarloTiles.default(d, q.device)

        def kernel_only(mode=mode, idx=idx, logq=logq, bias=bias, bs=bs, tiles=tiles):
            return M._MonteCarlo.apply(q, k, v, logq, idx, bias, bs, scale, False, mode == "shared", tiles)[0]

        _timed(g, f"mc triton {mode} kernels {tag}", kernel_only, flops, gathered)
        _timed(g, f"mc triton {mode} lowering {tag}", lambda kw=kw: M.montecarlo_attention(q, k, v, None, **kw),
               flops, gathered)  # fmt: skip
        _timed(g, f"mc torch {mode} lowering {tag}", lambda kw=kw: TM.attention_montecarlo(q, k, v, None, **kw),
               flops, gathered)  # fmt: skip
    exact = 4.0 * b * h * n * n * d
    _timed(g, f"sdpa exact B{b} H{h} N{n} d{d} bf16", lambda: F.scaled_dot_product_attention(q, k, v), exact)
    g.save()
