"""GPU benchmark of the Triton backend's kernels against the anchors, measured in the same run.

One script, one call on the lent GPU: correctness of every kernel against torch on the GPU first (bf16/fp16/fp32),
then timings (triton.testing.do_bench, median) of
- fused dot_exp forward and forward+backward vs SDPA (cuDNN, flash) and FlexAttention, d128 N4096 bf16;
- depthwise causal conv1d (k4) vs cuDNN and vs the copy bandwidth of the same card.
Writes JSON to bench/results/gpu-<card>.json (or $OUT). Usage: PYTHONPATH=. python bench/gpu.py [--quick]
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from itnet_compiler.backends.torch.attention import attention_dense  # noqa: E402
from itnet_compiler.backends.triton import attention as A  # noqa: E402
from itnet_compiler.backends.triton import conv as C  # noqa: E402

QUICK = "--quick" in sys.argv
dev = "cuda"
ROWS: list[dict] = []
CHECKS: list[dict] = []
R = {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name(),
     "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
OUT = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
OUTF = OUT / f"gpu-{R['gpu'].replace(' ', '_')}.json"


def save() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    OUTF.write_text(json.dumps(dict(R, checks=CHECKS, rows=ROWS), indent=1))


def bench(fn, rep=100) -> float:
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def row(name, ms, flops=None, bytes_=None, **extra):
    r = {"name": name, "ms": round(ms, 4), **extra}
    if flops:
        r["tflops"] = round(flops / ms / 1e9, 1)
    if bytes_:
        r["gbps"] = round(bytes_ / ms / 1e6, 1)
    ROWS.append(r)
    print(r, flush=True)
    save()
    return r


def section(f):
    t = time.time()
    try:
        f()
    except Exception as e:
        print("SECTION FAIL", f.__name__, type(e).__name__, str(e)[:400])
        traceback.print_exc()
    print(f"-- {f.__name__} {time.time() - t:.1f}s", flush=True)
    return f


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@section
def check_attention():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for b, h, hkv, n, d, causal, mask in ((2, 4, 2, 200, 64, True, None), (1, 8, 8, 333, 128, False, "bool"),
                                              (2, 2, 2, 128, 256, False, "add"), (1, 4, 1, 77, 16, True, None)):
            q = torch.randn(b, h, n, d, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(b, hkv, n, d, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(b, hkv, n, d, device=dev, dtype=dtype, requires_grad=True)
            m = None
            if mask == "bool":
                m = torch.rand(b, 1, n, n, device=dev) > 0.2
                m[..., 0] = True
            elif mask == "add":
                m = torch.randn(n, n, device=dev)
            o = A.fused_attention(q, k, v, m, scale=d**-0.5, causal=causal)
            do = torch.randn_like(o)
            g = torch.autograd.grad(o, (q, k, v), do)
            qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
            r = attention_dense(qr, kr, vr, m, scale=d**-0.5, causal=causal, return_weights=False)
            gr = torch.autograd.grad(r, (qr, kr, vr), do.float())
            errs = [rel(o, r)] + [rel(a, bb) for a, bb in zip(g, gr)]
            tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
            c = {"kernel": "dot_exp fused", "dtype": str(dtype), "shape": [b, h, hkv, n, d], "causal": causal,
                 "mask": mask, "max_rel_err": max(errs), "ok": max(errs) <= tol}  # fmt: skip
            CHECKS.append(c)
            print(c, flush=True)
    save()


@section
def check_depthwise():
    for dtype in (torch.float32, torch.bfloat16):
        for rank, c, size, k, s, pad in ((1, 64, 1000, 4, 1, ((3, 0),)), (2, 32, (31, 29), (3, 3), 2, ((1, 1), (1, 1)))):
            size = size if isinstance(size, tuple) else (size,)
            kk = k if isinstance(k, tuple) else (k,)
            x = torch.randn(2, c, *size, device=dev, dtype=dtype, requires_grad=True)
            w = torch.randn(c, 1, *kk, device=dev, dtype=dtype, requires_grad=True)
            bb = torch.randn(c, device=dev, dtype=dtype, requires_grad=True)
            kw = dict(stride=(s,) * rank, padding=pad, dilation=(1,) * rank, groups=c, transposed=False,
                      output_padding=(0,) * rank, padding_mode="zeros")  # fmt: skip
            y = C.depthwise_conv(x, w, bb, **kw)
            dy = torch.randn_like(y)
            g = torch.autograd.grad(y, (x, w, bb), dy)
            xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, bb))
            fpad = [p for lo_hi in reversed(pad) for p in lo_hi]
            conv = F.conv1d if rank == 1 else F.conv2d
            r = conv(F.pad(xr, fpad), wr, br, s, 0, 1, c)
            gr = torch.autograd.grad(r, (xr, wr, br), dy.double())
            errs = [rel(y, r)] + [rel(a, b2) for a, b2 in zip(g, gr)]
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            cc = {"kernel": "stationary depthwise", "dtype": str(dtype), "rank": rank, "max_rel_err": max(errs),
                  "ok": max(errs) <= tol}  # fmt: skip
            CHECKS.append(cc)
            print(cc, flush=True)
    save()


def attn_flops(b, h, n, d, causal, bwd):
    f = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
    return f * (3.5 if bwd else 1.0)


CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4), (128, 32, 4, 3), (64, 128, 8, 2)]
BWD_CONFIGS = [(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 3)]


@section
def attention_speed():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    d, n = 128, 4096
    b, h = (16 * 1024) // n * 2, 2048 // d
    for causal in (False, True):
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        tag = f"d{d} N{n} B{b}H{h} causal={causal}"
        best = None
        for bm, bn, w, st in CONFIGS[: 2 if QUICK else None]:
            opts = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
            try:
                ms = bench(lambda: A.fused_attention(q, k, v, None, scale=d**-0.5, causal=causal, **opts))
            except Exception as e:
                print("config failed", opts, type(e).__name__, str(e)[:200])
                continue
            r = row(f"itnet fused fwd {tag}", ms, attn_flops(b, h, n, d, causal, False), config=opts)
            best = r if best is None or r["ms"] < best["ms"] else best
        if best is not None:
            best_opts = best["config"]
            o = A.fused_attention(q, k, v, None, scale=d**-0.5, causal=causal, **best_opts)
            g = torch.randn_like(o)
            for bm, bn, w, st in BWD_CONFIGS[: 2 if QUICK else None]:
                opts = dict(best_opts, bwd_block_m=bm, bwd_block_n=bn, bwd_num_warps=w, bwd_num_stages=st)

                def fb(opts=opts):
                    A.fused_attention(q, k, v, None, scale=d**-0.5, causal=causal, **opts).backward(g)

                try:
                    row(f"itnet fused fwd+bwd {tag}", bench(fb), attn_flops(b, h, n, d, causal, True), config=opts)
                except Exception as e:
                    print("bwd config failed", opts, type(e).__name__, str(e)[:200])
        for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                    row(f"{name} fwd {tag}", bench(f), attn_flops(b, h, n, d, causal, False))
                    o = f()
                    g = torch.randn_like(o)
                    row(f"{name} fwd+bwd {tag}", bench(lambda: f().backward(g)), attn_flops(b, h, n, d, causal, True))
            except Exception as e:
                print(name, "failed", type(e).__name__, str(e)[:200])
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            fa = torch.compile(flex_attention)
            bm_ = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, n, n) if causal else None
            f = lambda: fa(q, k, v, block_mask=bm_)  # noqa: E731
            f()
            row(f"flex fwd {tag}", bench(f), attn_flops(b, h, n, d, causal, False))
            o = f()
            g = torch.randn_like(o)
            row(f"flex fwd+bwd {tag}", bench(lambda: f().backward(g)), attn_flops(b, h, n, d, causal, True))
        except Exception as e:
            print("flex failed", type(e).__name__, str(e)[:300])
        del q, k, v


@section
def depthwise_speed():
    x0 = torch.randn(2**30 // 2, device=dev, dtype=torch.bfloat16)
    y0 = torch.empty_like(x0)
    row("copy 1GiB d2d", bench(lambda: y0.copy_(x0)), bytes_=2 * x0.numel() * 2)
    del x0, y0
    x = torch.randn(16, 2048, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(2048, 1, 4, device=dev, dtype=torch.bfloat16)
    kw = dict(stride=(1,), padding=((3, 0),), dilation=(1,), groups=2048, transposed=False, output_padding=(0,),
              padding_mode="zeros")  # fmt: skip
    row("cudnn depthwise causal conv1d B16 C2048 L4096 k4", bench(lambda: F.conv1d(F.pad(x, (3, 0)), w, groups=2048)),
        bytes_=2 * x.numel() * 2)  # fmt: skip
    for bc, bl, nw in ((16, 128, 4), (8, 256, 4), (4, 512, 4), (16, 256, 8), (32, 128, 8), (2, 1024, 4)):
        try:
            ms = bench(lambda: C.depthwise_conv(x, w, None, **kw, block_c=bc, block_l=bl, num_warps=nw))
            row("itnet depthwise causal conv1d B16 C2048 L4096 k4", ms, bytes_=2 * x.numel() * 2,
                config=dict(block_c=bc, block_l=bl, num_warps=nw))  # fmt: skip
        except Exception as e:
            print("dw config failed", bc, bl, nw, type(e).__name__, str(e)[:200])


print("\nTABLE")
for r in ROWS:
    extra = (f"{r['tflops']:>7.1f} TFLOP/s" if "tflops" in r else "") + (f"{r['gbps']:>8.1f} GB/s" if "gbps" in r else "")
    print(f"{r['name']:<60} {r['ms']:>9.3f} ms  {extra}  {r.get('config', '')}")
print("checks ok:", all(c["ok"] for c in CHECKS), len(CHECKS))
save()
