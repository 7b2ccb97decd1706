"""GPU checks and timings of the Triton chunked (SSD) ssm kernels, run from bench/gpu.py.

``check(g)`` and ``speed(g)`` take ``g``, the namespace of bench/gpu.py (``row``, ``bench``, ``rel``, ``CHECKS``,
``dev``, ``save``). check: forward, final state and every gradient against float64 torch (the dense kernel and
autograd of the torch chunked lowering) in fp32, fp16 and bf16. speed: a Mamba2-sized layer (B8 H24 P64 N128 L2048,
chunk 64, bf16) forward and forward+backward against the torch chunked lowering, the Triton sequential scan
(``ssm.ssm_scan``) and the copy bandwidth (a torch clone moving the same bytes); GB/s count x, B, C read and y written.
"""

from __future__ import annotations

import math
import traceback

import torch

from itnet_compiler.backends.torch.recurrent import ssm_chunked, ssm_dense
from itnet_compiler.backends.triton import ssd as SSD
from itnet_compiler.backends.triton import ssm as S

KW = dict(dt_softplus=True, dt_min=0.0, dt_max=math.inf, return_state=True)
SPEED_SHAPE = (8, 2048, 24, 64, 1, 128, 64)  # batch, length, heads, head dim, groups, state, chunk


def _inputs(dev, bsz, L, H, P, G, N, dtype, seed=0):
    gen = torch.Generator(device=dev).manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=torch.float32):
        return (torch.randn(*shape, generator=gen, device=dev) * scale).to(dt)

    return [
        rnd(bsz, L, H, P, dt=dtype),
        rnd(bsz, L, H, scale=0.5),
        -torch.rand(H, generator=gen, device=dev) - 0.1,
        rnd(bsz, L, G, N, scale=N**-0.5, dt=dtype),
        rnd(bsz, L, G, N, scale=N**-0.5, dt=dtype),
        rnd(H),
        rnd(H, scale=0.3),
        rnd(bsz, H, P, N),
    ]


def check(g) -> None:
    tols = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
    for dtype, (bsz, L, H, P, G, N, chunk) in (
        (torch.float32, (2, 300, 8, 16, 2, 32, 64)),
        (torch.float32, (1, 200, 4, 64, 1, 128, 64)),
        (torch.float16, (2, 300, 8, 64, 2, 128, 64)),
        (torch.bfloat16, (2, 300, 8, 64, 2, 128, 64)),
        (torch.bfloat16, (2, 100, 4, 32, 1, 64, 32)),
    ):
        try:
            ins = _inputs(g.dev, bsz, L, H, P, G, N, dtype)
            leaves = [t.clone().requires_grad_() for t in ins]
            y, h = SSD.ssd_chunked(*leaves, **KW, chunk=chunk)
            dy, dh = torch.randn_like(y), torch.randn_like(h)
            grads = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), leaves)
            ref = [t.detach().double().requires_grad_() for t in ins]  # the same (rounded) inputs, in float64
            y_d, h_d = ssm_dense(*ref, **KW)
            y_r, h_r = ssm_chunked(*ref, **KW, chunk=chunk)
            ref_grads = torch.autograd.grad((y_r * dy.double()).sum() + (h_r * dh.double()).sum(), ref)
            errs = {"y": g.rel(y, y_d), "state": g.rel(h, h_d)}
            names = ("dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias", "dh0")
            errs.update({n: g.rel(a, r) for n, a, r in zip(names, grads, ref_grads, strict=True)})
            worst = max(errs.values())
            c = {"kernel": "ssm chunked (SSD)", "dtype": str(dtype), "shape": f"B{bsz} L{L} H{H} P{P} G{G} N{N}",
                 "chunk": chunk, "max_rel_err": worst, "errs": {k: float(f"{v:.3g}") for k, v in errs.items()},
                 "ok": worst <= tols[dtype]}  # fmt: skip
        except Exception as e:
            traceback.print_exc()
            c = {"kernel": "ssm chunked (SSD)", "dtype": str(dtype), "max_rel_err": float("nan"), "ok": False,
                 "error": f"{type(e).__name__}: {str(e)[:300]}"}  # fmt: skip
        g.CHECKS.append(c)
        print(c, flush=True)
    g.save()


def speed(g) -> None:
    bsz, L, H, P, G, N, chunk = SPEED_SHAPE
    dtype = torch.bfloat16
    shape = f"B{bsz} H{H} P{P} N{N} L{L} chunk{chunk} bf16"
    ins = _inputs(g.dev, bsz, L, H, P, G, N, dtype)[:7]  # no h0: a model's forward
    kw = dict(KW, return_state=False)
    el = torch.tensor([], dtype=dtype).element_size()
    nbytes = (2 * bsz * L * H * P + 2 * bsz * L * G * N) * el  # x, B, C read; y written
    # per step and head: C Bᵀ and M u on the [Q, Q] tile, the chunk state and C S_cᵀ
    flops = bsz * L * H * (2 * chunk * (N + P) + 4 * P * N)

    buf = torch.empty(nbytes // 2, dtype=torch.uint8, device=g.dev)
    g.row(f"torch clone moving the same bytes ({nbytes / 1e6:.0f} MB)", g.bench(lambda: buf.clone()), bytes_=nbytes)

    ref = ssm_chunked(*ins, **kw, chunk=chunk)

    def fwd():
        return SSD.ssd_chunked(*ins, **kw, chunk=chunk)

    for fw in (4, 8, 2):
        SSD.FWD_WARPS = fw
        try:
            ms = g.bench(fwd)
            g.row(f"itnet ssd fwd {shape}", ms, flops, nbytes, err=g.rel(fwd(), ref), config={"fwd_warps": fw})
        except Exception as e:
            print("ssd fwd config failed", fw, type(e).__name__, str(e)[:300], flush=True)
    SSD.FWD_WARPS = 4
    g.row(f"torch chunked lowering fwd {shape}", g.bench(lambda: ssm_chunked(*ins, **kw, chunk=chunk), rep=20), flops,
          nbytes)  # fmt: skip
    try:
        g.row(f"itnet ssm sequential scan (Triton) fwd {shape}", g.bench(lambda: S.ssm_scan(*ins, **kw), rep=20), flops,
              nbytes, err=g.rel(S.ssm_scan(*ins, **kw), ref))  # fmt: skip
    except Exception as e:
        print("scan fwd failed", type(e).__name__, str(e)[:300], flush=True)

    leaves = [t.clone().requires_grad_() for t in ins]
    dy = torch.randn_like(ins[0])

    def train(fn):
        return lambda: torch.autograd.grad(fn(*leaves, **kw), leaves, dy)

    for bw in (8, 4, 16):
        SSD.BWD_WARPS = bw
        try:
            ms = g.bench(train(lambda *a, **k: SSD.ssd_chunked(*a, **k, chunk=chunk)))
            g.row(f"itnet ssd fwd+bwd {shape}", ms, 3 * flops, 3 * nbytes, config={"bwd_warps": bw})
        except Exception as e:
            print("ssd bwd config failed", bw, type(e).__name__, str(e)[:300], flush=True)
    SSD.BWD_WARPS = 4
    try:
        ms = g.bench(train(lambda *a, **k: ssm_chunked(*a, **k, chunk=chunk)), rep=10)
        g.row(f"torch chunked lowering fwd+bwd {shape}", ms, 3 * flops, 3 * nbytes)
    except Exception as e:
        print("torch chunked fwd+bwd failed", type(e).__name__, str(e)[:300], flush=True)
    leaves = [t.detach().requires_grad_() for t in ins if isinstance(t, torch.Tensor)]
    reason = S.supported(*leaves)
    if reason is not None:  # past 32-bit offsets the kernel would fault and poison the CUDA context for what follows
        print("scan fwd+bwd not run:", reason, flush=True)
    else:  # stores every state (B·H·L·P·N float32) for its backward
        g.row(f"itnet ssm sequential scan (Triton) fwd+bwd {shape}", g.bench(train(S.ssm_scan), rep=5), 3 * flops,
              3 * nbytes)  # fmt: skip
    if g.dev == "cuda":
        torch.cuda.empty_cache()
    g.save()
