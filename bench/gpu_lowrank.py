"""GPU checks and timings of the Triton ``lowrank`` kernels of ``dot_exp`` (FAVOR+), run from bench/gpu.py.

``check(g)`` and ``speed(g)`` take ``g``, the namespace of bench/gpu.py (``row``, ``bench``, ``rel``, ``CHECKS``,
``dev``, ``save``). check: output and dq, dk, dv against the torch lowering run in float64 on the same (rounded)
inputs and the same options, in fp32, fp16 and bf16, non-causal and causal (local=1 and 0, a chunk that does not
divide N, GQA). speed: B2 H8 N8192 d64 r64 bf16, forward and forward+backward, non-causal and causal, against the
torch lowering with the same options and against SDPA (exact attention; flash-linear-attention is not installed).
"""

from __future__ import annotations

import traceback

import torch
import torch.nn.functional as F

from itnet_compiler.backends.torch import lowrank as TL
from itnet_compiler.backends.triton import lowrank as L

SPEED = (2, 8, 8192, 64, 64, 256)  # batch, heads, length, head dim, rank, chunk


def _inputs(dev, b, h, hkv, n, d, dtype, seed=0):
    gen = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randn(b, x, n, d, generator=gen, device=dev).to(dtype) for x in (h, hkv, hkv)]


def check(g) -> None:
    tols = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
    cases = [
        # b, h, h_kv, n, d, causal, options
        (2, 4, 4, 1000, 64, False, dict(method="favor", rank=64, seed=0)),
        (2, 4, 2, 1000, 64, True, dict(method="favor", rank=64, seed=1, chunk=256, local=1)),
        (2, 4, 4, 1000, 64, True, dict(method="favor", rank=64, seed=2, chunk=100, local=1)),
        (1, 4, 4, 777, 128, True, dict(method="favor", rank=32, seed=3, chunk=128, local=0)),
    ]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for b, h, hkv, n, d, causal, opts in cases:
            name = f"lowrank {'causal' if causal else 'full'} {dtype} B{b} H{h}/{hkv} N{n} d{d} {opts}"
            try:
                ins = _inputs(g.dev, b, h, hkv, n, d, dtype)
                leaves = [t.clone().requires_grad_() for t in ins]
                scale = d**-0.5
                y = L.attention_lowrank(*leaves, None, scale=scale, causal=causal, **opts)
                dy = torch.randn_like(y)
                grads = torch.autograd.grad(y, leaves, dy)
                ref = [t.detach().double().requires_grad_() for t in ins]
                y_r = TL.attention_lowrank(*ref, None, scale=scale, causal=causal, return_weights=False, **opts)
                ref_grads = torch.autograd.grad(y_r, ref, dy.double())
                errs = {"y": g.rel(y, y_r)}
                errs.update({n_: g.rel(a, r) for n_, a, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True)})
                worst = max(errs.values())
                c = {"kernel": name, "max_rel_err": worst, "errs": {k: float(f"{v:.3g}") for k, v in errs.items()},
                     "ok": worst <= tols[dtype]}  # fmt: skip
            except Exception as e:
                traceback.print_exc()
                c = {"kernel": name, "max_rel_err": float("nan"), "ok": False,
                     "error": f"{type(e).__name__}: {str(e)[:300]}"}  # fmt: skip
            g.CHECKS.append(c)
            print(c, flush=True)
    g.save()


def _timed(g, name, fn, flops, bytes_, **extra):
    """One forward row and one forward+backward row (backward FLOPs counted as 2x forward)."""
    try:
        out = fn()
        dy = torch.randn_like(out)
        g.row(f"{name} fwd", g.bench(fn), flops=flops, bytes_=bytes_, **extra)
        g.row(f"{name} fwd+bwd", g.bench(lambda: fn().backward(dy)), flops=3 * flops, bytes_=3 * bytes_, **extra)
    except Exception as e:
        traceback.print_exc()
        g.row(f"{name} FAILED", float("nan"), error=f"{type(e).__name__}: {str(e)[:200]}")


def speed(g) -> None:
    b, h, n, d, r, chunk = SPEED
    dtype = torch.bfloat16
    q, k, v = (t.requires_grad_() for t in _inputs(g.dev, b, h, h, n, d, dtype))
    scale = d**-0.5
    io = 4 * b * h * n * d * q.element_size()  # q, k, v read, y written
    tag = f"B{b}H{h} N{n} d{d} r{r} bf16"
    for causal, local in ((False, 1), (True, 1), (True, 0)):
        opts = dict(method="favor", rank=r, seed=0, chunk=chunk, local=local)
        kind = "full" if not causal else f"causal local={local} chunk={chunk}"
        work = L.flops(b, h, n, n, d, r, causal, chunk, bool(local))

        def tri(opts=opts, causal=causal):
            return L.attention_lowrank(q, k, v, None, scale=scale, causal=causal, **opts)

        def ref(opts=opts, causal=causal):
            return TL.attention_lowrank(q, k, v, None, scale=scale, causal=causal, return_weights=False, **opts)

        _timed(g, f"lowrank triton {kind} {tag}", tri, work, io)
        _timed(g, f"lowrank torch {kind} {tag}", ref, work, io)
        if local == 1:
            exact = 4.0 * b * h * n * n * d / (2 if causal else 1)
            _timed(g, f"sdpa exact {'causal' if causal else 'full'} {tag}",
                   lambda causal=causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale),
                   exact, io)  # fmt: skip
    g.save()
