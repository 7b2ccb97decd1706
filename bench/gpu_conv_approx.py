"""GPU checks and timings of the Triton ``lowrank`` and ``montecarlo`` lowerings of ``stationary`` (bench/gpu.py).

``check(g)`` and ``speed(g)`` take ``g``, the namespace of bench/gpu.py (``row``, ``bench``, ``rel``, ``CHECKS``,
``dev``, ``save``). Both backends factorise with the same code and draw the same taps from one seed, so:
- check: output, error estimate (montecarlo) and dx, dw, db against the torch lowering. fp32: the torch lowering in
  fp32 with the same options. fp16/bf16: the torch lowering in float64 on the same rounded inputs (montecarlo with the
  uniform proposal, whose draw does not depend on the inputs' precision). 1-d and 2-d, strided, dilated, grouped.
- speed: ResNet-like 3x3 conv, B32 C256 28² bf16: lowrank (svd, rank 64) and montecarlo (3 of 9 taps, shared) on
  Triton against cuDNN's exact conv and against the torch lowerings; forward (factors cached, as in a built module's
  inference) and forward+backward (per step: factorisation and its backward included, as in training), plus the
  kernels alone (the conv chain with given factors; the sampled-taps kernels with given taps). TFLOP/s count the
  work done (the chain's FLOPs; 2·N·OH·OW·CO·CI per sampled tap), not the exact conv's.
"""

from __future__ import annotations

import traceback

import torch
import torch.nn.functional as F

from itnet_compiler.backends.torch import lowrank_conv as LC
from itnet_compiler.backends.torch import montecarlo_conv as MC
from itnet_compiler.backends.torch.fused_conv import direct_form
from itnet_compiler.backends.torch.runtime import RuntimeState
from itnet_compiler.backends.triton import conv_approx as CA

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SPEED = (32, 256, 28, 64, 3)  # batch, channels, size, lowrank rank, montecarlo samples (of 9 taps)
CASES = [
    # rank, C_in, C_out, kernel, stride, dilation, groups, padding, size
    (2, 64, 96, 3, 1, 1, 1, 1, 20),
    (2, 64, 64, 3, 2, 1, 2, 1, 21),
    (2, 32, 48, 5, 1, 2, 1, 4, 17),
    (1, 64, 64, 7, 2, 2, 4, 6, 300),
]


def _static(rank, s, d, g, p):
    return {"stride": (s,) * rank, "padding": ((p, p),) * rank, "dilation": (d,) * rank, "groups": g,
            "transposed": False, "output_padding": (0,) * rank, "padding_mode": "zeros"}  # fmt: skip


def _inputs(dev, rank, cin, cout, k, g, size, dtype, seed=0):
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(2, cin, *([size] * rank), generator=gen, device=dev)
    w = torch.randn(cout, cin // g, *([k] * rank), generator=gen, device=dev) / (cin * k**rank / g) ** 0.5
    b = torch.randn(cout, generator=gen, device=dev)
    return [t.to(dtype) for t in (x, w, b)]


def _one(g, name, tri, ref, ins, dtype, opts, error):
    tols = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
    try:
        leaves = [t.clone().requires_grad_() for t in ins]
        exact = [t.detach().double().requires_grad_() for t in ins] if dtype != torch.float32 else None
        refs = exact or [t.clone().requires_grad_() for t in ins]
        with RuntimeState() as st_t:
            y = tri(*leaves, **opts)
        with RuntimeState() as st_r:
            y_r = ref(*refs, **opts)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, dy)
        ref_grads = torch.autograd.grad(y_r, refs, dy.to(y_r.dtype))
        errs = {"y": g.rel(y, y_r)}
        errs.update({k: g.rel(a, r) for k, a, r in zip(("dx", "dw", "db"), grads, ref_grads, strict=True)})
        if error:
            et, er = st_t.errors["conv"], st_r.errors["conv"]
            errs["err_abs"] = abs(et.abs - er.abs) / max(er.abs, 1e-30)
        worst = max(errs.values())
        c = {"kernel": name, "max_rel_err": worst, "errs": {k: float(f"{v:.3g}") for k, v in errs.items()},
             "ok": worst <= tols[dtype]}  # fmt: skip
    except Exception as e:
        traceback.print_exc()
        c = {"kernel": name, "max_rel_err": float("nan"), "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    g.CHECKS.append(c)
    print(c, flush=True)


def check(g) -> None:
    # The fp32 references must be fp32: cuDNN's default TF32 convolutions (the torch lowering's chain) are ~1e-4 off.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        _check(g)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _check(g) -> None:
    for dtype in DTYPES:
        for rank, cin, cout, k, s, d, grp, p, size in CASES:
            ins = _inputs(g.dev, rank, cin, cout, k, grp, size, dtype)
            static = _static(rank, s, d, grp, p)
            tag = f"{rank}d C{cin}->{cout} k{k} s{s} d{d} g{grp} {dtype}"
            for method in ("svd", "spatial") if rank == 2 else ("svd",):
                opts = {**static, "layer": "conv", "method": method, "rank": 8}
                _one(g, f"conv lowrank {method} r8 {tag}", CA.conv_lowrank, LC.conv_lowrank, ins, dtype, opts, False)
            proposal = "norm" if dtype == torch.float32 else "uniform"
            opts = {**static, "layer": "conv", "samples": 5, "mode": "shared", "proposal": proposal, "seed": 1}
            name = f"conv montecarlo shared {proposal} M5 {tag}"
            _one(g, name, CA.conv_montecarlo, MC.conv_montecarlo, ins, dtype, opts, True)
    g.save()


def _timed(g, name, fn, flops, bytes_, fwd=True, bwd=True, **extra):
    try:
        out = fn()
        dy = torch.randn_like(out)
        if fwd:
            g.row(f"{name} fwd", g.bench(fn), flops=flops, bytes_=bytes_, **extra)
        if bwd:
            g.row(f"{name} fwd+bwd", g.bench(lambda: fn().backward(dy)), flops=3 * flops, bytes_=3 * bytes_, **extra)
    except Exception as e:
        traceback.print_exc()
        g.row(f"{name} FAILED", float("nan"), error=f"{type(e).__name__}: {str(e)[:200]}")


def _three_taps_seed(dev, samples: int) -> int:
    """A seed whose uniform draw of ``samples`` out of 9 taps hits ``samples`` distinct taps (the draw the lowering
    makes: a generator on the input's device, multinomial with replacement)."""
    q = torch.full((9,), 1 / 9, dtype=torch.float64, device=dev)
    for seed in range(100):
        gen = torch.Generator(device=dev).manual_seed(seed)
        if torch.multinomial(q, samples, replacement=True, generator=gen).unique().numel() == samples:
            return seed
    return 0


def speed(g) -> None:
    b, c, n, r, m = SPEED
    dtype = torch.bfloat16
    gen = torch.Generator(device=g.dev).manual_seed(0)
    x = torch.randn(b, c, n, n, generator=gen, device=g.dev).to(dtype).requires_grad_()
    w = (torch.randn(c, c, 3, 3, generator=gen, device=g.dev) / (9 * c) ** 0.5).to(dtype).requires_grad_()
    bias = torch.randn(c, generator=gen, device=g.dev).to(dtype).requires_grad_()
    static = _static(2, 1, 1, 1, 1)
    io = 2 * x.numel() * x.element_size() + w.numel() * w.element_size()
    tag = f"3x3 B{b} C{c} {n}x{n} bf16"
    exact_flops = 2.0 * b * n * n * c * c * 9
    _timed(g, f"conv cudnn exact {tag}", lambda: F.conv2d(x, w, bias, padding=1), exact_flops, io)

    # lowrank svd: conv C -> r (3x3), then 1x1 r -> C
    lr_flops = 2.0 * b * n * n * r * (9 * c + c)
    lr = {**static, "layer": "conv", "method": "svd", "rank": r}
    for label, fn in (("triton", CA.conv_lowrank), ("torch", LC.conv_lowrank)):
        state = RuntimeState()

        def cached_fwd(fn=fn, state=state):
            with state, torch.no_grad():
                return fn(x, w, bias, **lr)

        _timed(g, f"conv lowrank {label} svd r{r} {tag} (factors cached)", cached_fwd, lr_flops, io, bwd=False)
        _timed(g, f"conv lowrank {label} svd r{r} {tag} (factorised per step)", lambda fn=fn: fn(x, w, bias, **lr),
               lr_flops, io, fwd=False)  # fmt: skip
    dc = direct_form(x.detach(), w.detach(), **static)
    chain = LC.factorize(dc, LC.ConvLowRankOptions(rank=r))
    factors = [st[0].detach().clone().requires_grad_() for st in chain.steps]

    def chain_only():
        y = dc.x
        for i, ((_, s, d, grp), f) in enumerate(zip(chain.steps, factors, strict=True)):
            last = i == len(factors) - 1
            y = CA._chain_step(y, f, bias if last else None, s, d, grp, {}, "conv")
        return y

    _timed(g, f"conv lowrank triton chain kernels r{r} {tag}", chain_only, lr_flops, io)

    # montecarlo, shared taps: m samples of the 9 taps, a seed that draws m distinct ones
    seed = _three_taps_seed(g.dev, m)
    mc_flops = 2.0 * b * n * n * c * c * m
    mc = {**static, "layer": "conv", "samples": m, "mode": "shared", "seed": seed}
    for proposal in ("uniform", "norm"):
        for label, fn in (("triton", CA.conv_montecarlo), ("torch", MC.conv_montecarlo)):
            _timed(g, f"conv montecarlo {label} {proposal} {m}/9 taps {tag}",
                   lambda fn=fn, proposal=proposal: fn(x, w, bias, **mc, proposal=proposal), mc_flops, io)  # fmt: skip
    dcg = direct_form(x, w, **static)
    taps = torch.tensor([[0, 0], [1, 2], [2, 1]][:m], dtype=torch.int32, device=g.dev)
    scale = torch.full((m,), 9.0 / m, device=g.dev)
    tiles = CA.McTiles.default(x.device)

    def kernels_only():
        return CA._SampledTaps.apply(dcg.x, w, bias, taps, scale, scale, (1, 1), (1, 1), 1, dcg.out_size, tiles)[0]

    _timed(g, f"conv montecarlo triton kernels {m}/9 taps {tag}", kernels_only, mc_flops, io, tiles=str(tiles))
    g.save()
