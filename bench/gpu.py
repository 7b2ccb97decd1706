"""GPU benchmark of the Triton backend's kernels against the anchors, measured in the same run.

One script, one call on the lent GPU: correctness of every kernel against torch on the GPU first (bf16/fp16/fp32),
then timings (triton.testing.do_bench, median) of
- fused dot_exp forward and forward+backward vs SDPA (cuDNN, flash) and FlexAttention, d128 N4096 bf16;
- depthwise causal conv1d (k4) vs cuDNN and vs the copy bandwidth of the same card;
- the implicit-GEMM convolution vs cuDNN (dense 3x3, bf16);
- the ssm selective scan (Mamba layout) vs a torch loop and vs the copy bandwidth;
- sliding-window and document-masked attention (block sparsity, forward and backward) vs FlexAttention's block masks;
- the parts in bench/gpu_<part>.py (gated LSTM/GRU vs cuDNN, the SSD chunked scan, the montecarlo and lowrank
  kernels), each a ``check(g)`` and a ``speed(g)`` that receive this module.
Writes JSON to bench/results/gpu-<card>.json (or $OUT).
Usage: PYTHONPATH=. python bench/gpu.py [--quick] [--only name,name] (section names or substrings of them).
"""

from __future__ import annotations

import importlib.util
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
from itnet_compiler.backends.torch.recurrent import ssm_dense  # noqa: E402
from itnet_compiler.backends.triton import attention as A  # noqa: E402
from itnet_compiler.backends.triton import conv as C  # noqa: E402
from itnet_compiler.backends.triton import ssm as S  # noqa: E402

QUICK = "--quick" in sys.argv
ONLY = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
dev = "cuda"
ROWS: list[dict] = []
CHECKS: list[dict] = []
R = {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name(),
     "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
NAME = f"gpu-{R['gpu'].replace(' ', '_')}.json"
# Always bench/results/; also $OUT when the device tool provides one (what comes back from the lent machine).
DESTS = [Path(__file__).parent / "results"] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])


def save() -> None:
    for d in DESTS:
        d.mkdir(parents=True, exist_ok=True)
        (d / NAME).write_text(json.dumps(dict(R, checks=CHECKS, rows=ROWS), indent=1))


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
    if ONLY is not None and not any(part in f.__name__ for part in ONLY):
        return f
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
        for b, h, hkv, n, d, causal, mask in (
            (2, 4, 2, 200, 64, True, None),
            (1, 8, 8, 333, 128, False, "bool"),
            (2, 2, 2, 128, 256, False, "add"),
            (1, 4, 1, 77, 16, True, None),
        ):
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
        cases = ((1, 64, 1000, 4, 1, ((3, 0),)), (2, 32, (31, 29), (3, 3), 2, ((1, 1), (1, 1))))
        for rank, c, size, k, s, pad in cases:
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


CONFIGS = [
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (64, 64, 4, 3),
    (128, 64, 8, 4),
    (128, 128, 8, 2),
    (128, 32, 4, 3),
    (64, 128, 4, 3),
]
BWD_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 8, 2)]


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


@section
def depthwise_speed():
    x0 = torch.randn(2**30 // 2, device=dev, dtype=torch.bfloat16)
    y0 = torch.empty_like(x0)
    row("copy 1GiB d2d", bench(lambda: y0.copy_(x0)), bytes_=2 * x0.numel() * 2)
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


@section
def check_gemm_conv_and_ssm():
    for dtype in (torch.float32, torch.bfloat16):
        for transposed in (False, True):
            x = torch.randn(2, 8, 19, 17, device=dev, dtype=dtype, requires_grad=True)
            ws = (8, 6 // 2, 3, 3) if transposed else (6, 8 // 2, 3, 3)
            w = torch.randn(*ws, device=dev, dtype=dtype, requires_grad=True)
            kw = dict(stride=(2, 1), padding=((1, 1), (1, 1)), dilation=(1, 2), groups=2, transposed=transposed,
                      output_padding=(1, 0) if transposed else (0, 0), padding_mode="zeros")  # fmt: skip
            y = C.direct_conv(x, w, None, **kw)
            dy = torch.randn_like(y)
            g = torch.autograd.grad(y, (x, w), dy)
            xr, wr = (t.detach().double().requires_grad_() for t in (x, w))
            if transposed:
                r = F.conv_transpose2d(xr, wr, None, (2, 1), (1, 1), (1, 0), 2, (1, 2))
            else:
                r = F.conv2d(xr, wr, None, (2, 1), (1, 1), (1, 2), 2)
            gr = torch.autograd.grad(r, (xr, wr), dy.double())
            errs = [rel(y, r)] + [rel(a, b2) for a, b2 in zip(g, gr)]
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            c = {"kernel": "stationary implicit gemm", "dtype": str(dtype), "transposed": transposed,
                 "max_rel_err": max(errs), "ok": max(errs) <= tol}  # fmt: skip
            CHECKS.append(c)
            print(c, flush=True)
    for P, N, G in ((1, 16, 1), (16, 32, 2)):
        bsz, L, H = 2, 300, 8
        ins = [
            torch.randn(bsz, L, H, P, device=dev),
            torch.randn(bsz, L, H, device=dev) * 0.5,
            -torch.rand(H, N, device=dev),
            torch.randn(bsz, L, G, N, device=dev),
            torch.randn(bsz, L, G, N, device=dev),
            torch.randn(H, device=dev),
            torch.randn(H, device=dev) * 0.1,
        ]
        kw = dict(dt_softplus=True, dt_min=0.0, dt_max=float("inf"), return_state=False)
        leaves = [t.clone().requires_grad_() for t in ins]
        y = S.ssm_scan(*leaves, **kw)
        dy = torch.randn_like(y)
        g = torch.autograd.grad(y, leaves, dy)
        ref_leaves = [t.double().clone().requires_grad_() for t in ins]
        r = ssm_dense(*ref_leaves, **kw)
        gr = torch.autograd.grad(r, ref_leaves, dy.double())
        errs = [rel(y, r)] + [rel(a, b2) for a, b2 in zip(g, gr)]
        c = {"kernel": "ssm scan", "P": P, "N": N, "max_rel_err": max(errs), "ok": max(errs) <= 1e-4}
        CHECKS.append(c)
        print(c, flush=True)
    save()


@section
def gemm_conv_speed():
    torch.backends.cudnn.benchmark = True
    for bn, c, hw in ((64, 64, 56), (64, 256, 14)):
        x = torch.randn(bn, c, hw, hw, device=dev, dtype=torch.bfloat16)
        w = torch.randn(c, c, 3, 3, device=dev, dtype=torch.bfloat16)
        fl = 2 * bn * c * c * hw * hw * 9
        xl, wl = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
        row(f"cudnn conv2d B{bn} C{c} {hw}x{hw} k3 (channels_last)", bench(lambda: F.conv2d(xl, wl, padding=1)), fl)
        row(f"cudnn conv2d B{bn} C{c} {hw}x{hw} k3 (NCHW)", bench(lambda: F.conv2d(x, w, padding=1)), fl)
        kw = dict(stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1), groups=1, transposed=False,
                  output_padding=(0, 0), padding_mode="zeros")  # fmt: skip
        for bm, bnn, bk, nw, st in ((128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 64, 4, 3)):
            try:
                ms = bench(lambda: C.direct_conv(x, w, None, **kw, block_m=bm, block_n=bnn, block_k=bk, num_warps=nw,
                                                 num_stages=st))  # fmt: skip
                row(f"itnet implicit-gemm conv2d B{bn} C{c} {hw}x{hw} k3", ms, fl,
                    config=dict(block_m=bm, block_n=bnn, block_k=bk, num_warps=nw, num_stages=st))  # fmt: skip
            except Exception as e:
                print("gemm config failed", type(e).__name__, str(e)[:200])


@section
def ssm_speed():
    bsz, D, N, L = 8, 1536, 16, 2048
    x = torch.randn(bsz, D, L, device=dev)
    dt = torch.rand(bsz, D, L, device=dev) * 0.1
    A = -torch.rand(D, N, device=dev)
    Bm = torch.randn(bsz, N, L, device=dev)
    Cm = torch.randn(bsz, N, L, device=dev)
    nbytes = (3 * bsz * D * L + 2 * bsz * N * L) * 4

    def loop():
        h = torch.zeros(bsz, D, N, device=dev)
        ys = []
        dA = torch.exp(dt.unsqueeze(-1) * A[None, :, None, :])
        dBx = dt.unsqueeze(-1) * Bm.transpose(1, 2).unsqueeze(1) * x.unsqueeze(-1)
        for t in range(L):
            h = dA[:, :, t] * h + dBx[:, :, t]
            ys.append((h * Cm[:, :, t].unsqueeze(1)).sum(-1))
        return torch.stack(ys, -1)

    row(f"torch loop selective scan fp32 B{bsz} D{D} N{N} L{L}", bench(loop, rep=20), bytes_=nbytes)
    xs = x.transpose(1, 2).unsqueeze(-1)  # [B, L, H=D, P=1]
    dts = dt.transpose(1, 2)
    Bs = Bm.transpose(1, 2).unsqueeze(2)  # [B, L, G=1, N]
    Cs = Cm.transpose(1, 2).unsqueeze(2)
    kw = dict(dt_softplus=False, dt_min=-float("inf"), dt_max=float("inf"), return_state=False)
    ref = loop().transpose(1, 2)
    out = S.ssm_scan(xs, dts, A, Bs, Cs, **kw)[..., 0]
    print("ssm max rel err vs loop", rel(out, ref))
    for bt, nw in ((64, 4), (32, 2), (128, 4), (256, 8), (64, 2), (128, 8)):
        S.BLOCK_T, S.NUM_WARPS = bt, nw
        try:
            row(f"itnet ssm scan fwd fp32 B{bsz} D{D} N{N} L{L}", bench(lambda: S.ssm_scan(xs, dts, A, Bs, Cs, **kw)),
                bytes_=nbytes, err=rel(S.ssm_scan(xs, dts, A, Bs, Cs, **kw)[..., 0], ref),
                config=dict(block_t=bt, num_warps=nw))  # fmt: skip
        except Exception as e:
            print("ssm config failed", bt, nw, type(e).__name__, str(e)[:200])
    S.BLOCK_T, S.NUM_WARPS = 64, 4
    S.SEQUENTIAL_ONLY = True
    row(f"itnet ssm scan fwd fp32 (sequential kernel) B{bsz} D{D} N{N} L{L}",
        bench(lambda: S.ssm_scan(xs, dts, A, Bs, Cs, **kw)), bytes_=nbytes)  # fmt: skip
    S.SEQUENTIAL_ONLY = False
    leaves = [t.clone().requires_grad_() for t in (xs, dts, A, Bs, Cs)]
    y = S.ssm_scan(*leaves, **kw)
    g = torch.randn_like(y)
    row(f"itnet ssm scan fwd+bwd fp32 B{bsz} D{D} N{N} L{L}", bench(lambda: S.ssm_scan(*leaves, **kw).backward(g)),
        bytes_=nbytes * 3)  # fmt: skip


@section
def end_to_end_models():
    """Converted models on the Triton backend, on the GPU: outputs and one training step against eager."""
    import importlib.util

    from transformers import BertConfig, BertModel

    import itnet_compiler as itc

    def leaves(o):
        return [x for x in torch.utils._pytree.tree_flatten(o)[0] if isinstance(x, torch.Tensor)]

    def compare(name, model, args):
        prog = itc.convert(model, args)
        mod = itc.build(prog, backend="triton").to(dev)
        model = model.to(dev)
        args = tuple(a.to(dev) for a in args)
        out, ref = leaves(mod(*args)), leaves(model(*args))
        err = max(rel(a, b) for a, b in zip(out, ref))
        r = torch.randn_like(ref[0])
        (out[0] * r).sum().backward()
        (ref[0] * r).sum().backward()
        ref_params = dict(model.named_parameters())
        scale = max(p.grad.abs().max().item() for p in ref_params.values() if p.grad is not None)
        gerr = max(((p.grad - ref_params[k].grad).abs().max() / scale).item()
                   for k, p in mod.gm.named_parameters() if p.grad is not None)  # fmt: skip
        with torch.no_grad():
            t_eager = bench(lambda: model(*args), rep=50)
            t_itnet = bench(lambda: mod(*args), rep=50)
        c = {"kernel": f"e2e {name}", "max_rel_err": err, "grad_err_vs_max": gerr, "fallbacks": mod.fallbacks,
             "lowerings": sorted({t.lowering for t in mod.program.transforms}), "ok": err <= 1e-4 and gerr <= 1e-3,
             "eager_ms": round(t_eager, 3), "itnet_ms": round(t_itnet, 3)}  # fmt: skip
        CHECKS.append(c)
        print(c, flush=True)
        save()

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                     vocab_size=1000, max_position_embeddings=1024, attn_implementation="sdpa")  # fmt: skip
    compare("bert h256 L4 seq512 fp32", BertModel(cfg).eval(), (torch.randint(0, 1000, (8, 512)),))
    spec = importlib.util.spec_from_file_location("cnn", Path(__file__).resolve().parents[1] / "examples" / "cnn.py")
    cnn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cnn)
    model, args = cnn.make_model()
    compare("example CNN fp32", model, args)


def block_sparse_attention_speed():
    """Sliding window (d128 N8192 r1024) and document masking (8 documents, fwd and fwd+bwd) vs FlexAttention."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    fa = torch.compile(flex_attention)
    d, n, b, h, r = 128, 8192, 2, 16, 1024
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    work = 4 * b * h * n * r * d  # admitted pairs only: the useful FLOPs
    for tag, ours, flex_mask in (
        ("window r1024", dict(causal=True, window=r, mask=None),
         create_block_mask(lambda b_, h_, i, j: (i >= j) & (i - j < r), None, None, n, n)),
        ("documents 8x1024", dict(causal=False, window=0,
                                  mask=(torch.arange(n, device=dev) // 1024)[:, None]
                                  == (torch.arange(n, device=dev) // 1024)[None, :]),
         create_block_mask(lambda b_, h_, i, j: i // 1024 == j // 1024, None, None, n, n)),
    ):  # fmt: skip
        mask = ours.pop("mask")
        f_ours = lambda: A.fused_attention(q, k, v, mask, scale=d**-0.5, **ours)  # noqa: E731
        f_flex = lambda: fa(q, k, v, block_mask=flex_mask)  # noqa: E731
        # correctness first, on one batch entry and two heads (the dense reference is O(N²) memory)
        small = [t.detach()[:1, :2].float() for t in (q, k, v)]
        got = A.fused_attention(*(t.bfloat16() for t in small), mask, scale=d**-0.5, **ours)
        ref = attention_dense(*small, mask, scale=d**-0.5, return_weights=False, **ours)
        err = rel(got, ref)
        CHECKS.append({"kernel": f"dot_exp {tag}", "dtype": "bf16", "max_rel_err": err, "ok": err < 3e-2})
        g = torch.randn_like(f_flex())
        for name, f in (("itnet", f_ours), ("flex", f_flex)):
            row(f"{name} fwd {tag} d{d} N{n} B{b}H{h}", bench(f), work)
            row(f"{name} fwd+bwd {tag} d{d} N{n} B{b}H{h}", bench(lambda f=f: f().backward(g)), work * 3.5)


section(block_sparse_attention_speed)
G = sys.modules[__name__]
for part in ("gated", "ssd", "montecarlo", "lowrank", "conv_approx", "conv3d"):
    path = Path(__file__).parent / f"gpu_{part}.py"
    if not path.exists():
        continue
    spec = importlib.util.spec_from_file_location(f"gpu_{part}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for kind in ("check", "speed"):
        run_part = (lambda fn: lambda: fn(G))(getattr(mod, kind))
        run_part.__name__ = f"{part}_{kind}"
        section(run_part)


print("\nTABLE")
for r in ROWS:
    extra = f"{r['tflops']:>7.1f} TFLOP/s" if "tflops" in r else ""
    extra += f"{r['gbps']:>8.1f} GB/s" if "gbps" in r else ""
    print(f"{r['name']:<60} {r['ms']:>9.3f} ms  {extra}  {r.get('config', '')}")
print("checks ok:", all(c["ok"] for c in CHECKS), len(CHECKS))
save()
