"""GPU check and benchmark of the gated scans (Triton LSTM/GRU, LSTM projections included) against torch's cuDNN RNN.

Wired into bench/gpu.py: ``check(g)`` and ``speed(g)`` take that script's namespace ``g`` (g.row, g.bench, g.rel,
g.CHECKS, g.dev, g.save). check: outputs and every gradient against nn.LSTM/nn.GRU in float64 on the GPU, float32
(FMA path, and the tf32 tensor-core path) and float16, with and without proj_size, with a small (weights kept in
registers) and a large (weights streamed) hidden size. speed: H=256, T=2048, B=64, input 256, forward (no grad) and
forward+backward, against nn.LSTM/nn.GRU on cuDNN in the same run; each row carries ``vs_cudnn`` = cuDNN ms / itnet ms
(≥ 1 means at least as fast). A few launch configurations (module knobs of the backend) are swept for the forward.
"""

from __future__ import annotations

import time

import torch

from itnet_compiler.backends.triton import gated as G

TOLS = {torch.float32: 1e-4, torch.float16: 1e-2, "tf32": 5e-3}


def _knobs(**kw):
    """Set module knobs of the backend; returns the previous values (to restore)."""
    old = {k: getattr(G, k) for k in kw}
    for k, v in kw.items():
        setattr(G, k, v)
    return old


def _run(g, cell, dtype, layers, bidir, b, t, i, h, proj, mode):
    dev = g.dev
    torch.manual_seed(0)
    cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    extra = {"proj_size": proj} if proj else {}
    ref_mod = cls(i, h, num_layers=layers, bidirectional=bidir, batch_first=True, **extra).to(dev, torch.float64)
    dirs, hout = layers * (1 + bidir), proj or h
    x = torch.randn(b, t, i, device=dev, dtype=torch.float64)
    states = [torch.randn(dirs, b, hout, device=dev, dtype=torch.float64) * 0.5]
    if cell == "lstm":
        states.append(torch.randn(dirs, b, h, device=dev, dtype=torch.float64) * 0.5)
    ref_in = [x.clone().requires_grad_(), *ref_mod._flat_weights, *(s.clone().requires_grad_() for s in states)]
    hx = tuple(ref_in[-2:]) if cell == "lstm" else ref_in[-1]
    y_ref, hn_ref = ref_mod(ref_in[0], hx)
    refs = [y_ref, *(hn_ref if cell == "lstm" else (hn_ref,))]
    leaves = [v.detach().to(dtype).requires_grad_() for v in ref_in]
    n_w = len(ref_mod._flat_weights)
    st = leaves[1 + n_w :]
    kw = dict(cell=cell, hidden_size=h, proj_size=proj, num_layers=layers, bidirectional=bidir, batch_first=True,
              bias=True)  # fmt: skip
    old = _knobs(FP32_PRECISION="tf32" if mode == "tf32" else "ieee")
    try:
        reason = G.supported(leaves[0], leaves[1 : 1 + n_w], **kw)
        assert reason is None, reason
        with torch.no_grad():
            inference = G.gated_scan(leaves[0], leaves[1 : 1 + n_w], *st, **kw)
        outs = G.gated_scan(leaves[0], leaves[1 : 1 + n_w], *st, **kw)
        cots = [torch.randn_like(r) for r in refs]
        loss = sum((o.double() * c).sum() for o, c in zip(outs, cots))
        grads = torch.autograd.grad(loss, leaves)
    finally:
        _knobs(**old)
    ref_grads = torch.autograd.grad(sum((r * c).sum() for r, c in zip(refs, cots)), ref_in)
    errs = [g.rel(o, r) for o, r in zip(outs, refs)] + [g.rel(o, r) for o, r in zip(inference, refs)]
    errs += [g.rel(a, r) for a, r in zip(grads, ref_grads)]
    return max(errs)


CHECK_CASES = [
    # cell, layers, bidirectional, batch, length, input, hidden, proj
    ("lstm", 2, True, 5, 40, 24, 32, 0),
    ("lstm", 2, True, 5, 40, 24, 32, 12),
    ("gru", 2, True, 5, 40, 24, 32, 0),
    ("lstm", 1, False, 37, 64, 64, 256, 0),
    ("lstm", 1, True, 37, 64, 64, 256, 128),
    ("gru", 1, False, 37, 64, 64, 256, 0),
]


def check(g, cases=CHECK_CASES):
    for dtype, mode in ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float16, "fp16")):
        for cell, layers, bidir, b, t, i, h, proj in cases:
            t0 = time.time()
            try:
                err = _run(g, cell, dtype, layers, bidir, b, t, i, h, proj, mode)
                note = ""
            except Exception as e:  # a failed compile or launch is a failed check, recorded with its reason
                err, note = float("inf"), f"{type(e).__name__}: {str(e)[:300]}"
            tol = TOLS["tf32" if mode == "tf32" else dtype]
            c = {"kernel": f"gated {cell}" + (" proj" if proj else ""), "dtype": str(dtype), "mode": mode,
                 "shape": [layers, int(bidir), b, t, i, h, proj], "max_rel_err": err, "ok": err <= tol,
                 "s": round(time.time() - t0, 1)}  # fmt: skip
            if note:
                c["error"] = note
            g.CHECKS.append(c)
            print(c, flush=True)
    g.save()


def _flops(cell, t, b, i, h, p):
    gates = 4 if cell == "lstm" else 3
    return 2 * t * b * gates * h * (i + (p or h)) + (2 * t * b * h * p if p else 0)


def speed(g, t=2048, b=64, i=256, h=256, proj_size=128):
    dev = g.dev
    tf32_default = torch.backends.cudnn.allow_tf32
    for cell, proj in (("lstm", 0), ("gru", 0), ("lstm", proj_size)):
        for dtype in (torch.float32, torch.float16):
            tag = f"{cell}{f' proj{proj}' if proj else ''} {str(dtype)[6:]} H{h} T{t} B{b} I{i}"
            torch.manual_seed(0)
            cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
            mod = cls(i, h, **({"proj_size": proj} if proj else {})).to(dev, dtype)
            x = torch.randn(t, b, i, device=dev, dtype=dtype)
            xg = x.clone().requires_grad_()
            weights = list(mod._flat_weights)
            kw = dict(cell=cell, hidden_size=h, proj_size=proj, num_layers=1, bidirectional=False, batch_first=False,
                      bias=True)  # fmt: skip
            fl = _flops(cell, t, b, i, h, proj)
            gy = torch.randn(t, b, proj or h, device=dev, dtype=dtype)

            def cudnn_fwd():
                with torch.no_grad():
                    mod(x)

            def cudnn_fb():
                mod(xg)[0].backward(gy)

            base = {}
            for allow in (True, False) if dtype == torch.float32 else (tf32_default,):
                torch.backends.cudnn.allow_tf32 = allow
                suffix = (" tf32" if allow else " ieee") if dtype == torch.float32 else ""
                base[allow] = (g.bench(cudnn_fwd), g.bench(cudnn_fb))
                g.row(f"cudnn {cell} fwd {tag}{suffix}", base[allow][0], fl)
                g.row(f"cudnn {cell} fwd+bwd {tag}{suffix}", base[allow][1], 3 * fl)
            torch.backends.cudnn.allow_tf32 = tf32_default
            ref_fwd = base[tf32_default][0]
            ref_fb = base[tf32_default][1]

            def ours_fwd():
                with torch.no_grad():
                    G.gated_scan(x, weights, **kw)

            def ours_fb():
                G.gated_scan(xg, weights, **kw)[0].backward(gy)

            if dtype == torch.float32:
                configs = [dict(FP32_PRECISION="ieee"), dict(FP32_PRECISION="ieee", FMA_BLOCK_B=2),
                           dict(FP32_PRECISION="ieee", FMA_BLOCK_B=8), dict(FP32_PRECISION="ieee", NUM_WARPS=4),
                           dict(FP32_PRECISION="ieee", FMA_STREAM_BLOCK=16), dict(FP32_PRECISION="tf32"),
                           dict(FP32_PRECISION="tf32", NUM_WARPS=4)]  # fmt: skip
            else:
                configs = [dict(), dict(NUM_WARPS=4), dict(STREAM_BLOCK=32)]
            best = {}
            for conf in configs:
                old = _knobs(**conf)
                try:
                    mode = conf.get("FP32_PRECISION", "fp16")
                    ms = g.bench(ours_fwd)
                    g.row(f"itnet {cell} fwd {tag}", ms, fl, config=conf, vs_cudnn=round(ref_fwd / ms, 3))
                    if mode not in best or ms < best[mode][0]:
                        best[mode] = (ms, conf)
                except Exception as e:
                    print("gated config failed", conf, type(e).__name__, str(e)[:300], flush=True)
                finally:
                    _knobs(**old)
            for _mode, (_, conf) in best.items():
                old = _knobs(**conf)
                try:
                    ms = g.bench(ours_fb)
                    g.row(f"itnet {cell} fwd+bwd {tag}", ms, 3 * fl, config=conf, vs_cudnn=round(ref_fb / ms, 3))
                except Exception as e:
                    print("gated fwd+bwd failed", conf, type(e).__name__, str(e)[:300], flush=True)
                finally:
                    _knobs(**old)
            summary = ", ".join(f"{m} {v[0]:.2f} ms (x{ref_fwd / v[0]:.2f})" for m, v in best.items())
            print(
                f"-- {tag}: cuDNN fwd {ref_fwd:.2f} ms, fwd+bwd {ref_fb:.2f} ms; best itnet fwd {summary}", flush=True
            )
    g.save()
