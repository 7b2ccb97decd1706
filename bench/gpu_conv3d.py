"""GPU check and benchmark of 3-d convolutions on the Triton ``stationary`` kernels, run from bench/gpu.py.

``check(g)`` and ``speed(g)`` take ``g``, the namespace of bench/gpu.py (``row``, ``bench``, ``rel``, ``CHECKS``,
``dev``, ``save``). check: output and every gradient (x, weight, bias) against torch's conv3d / conv_transpose3d in
float64 on the GPU, in fp32 and bf16 (fp16 is covered by the interpreter tests), over dense, grouped + dilated,
strided, depthwise and transposed (with output_padding) geometries. speed: Conv3d 3x3x3 B8 C64 16x56x56 bf16 forward
and forward+backward (implicit GEMM) against cuDNN in NCDHW and channels_last_3d, and a depthwise 3x3x3 C128 layer
against cuDNN and the copy bandwidth; rows carry ``vs_cudnn`` = cuDNN (NCDHW) ms / itnet ms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from itnet_compiler.backends.triton import conv as C

TOLS = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
CASES = [
    # c_in, c_out, size, kernel, stride, dilation, padding, groups, transposed, output_padding
    (16, 32, (9, 17, 15), (3, 3, 3), (1, 2, 2), (1, 1, 1), (1, 1, 1), 1, False, (0, 0, 0)),
    (16, 24, (8, 13, 11), (2, 3, 3), (2, 1, 1), (2, 1, 2), (1, 1, 2), 4, False, (0, 0, 0)),
    (32, 32, (7, 19, 20), (3, 3, 3), (2, 2, 1), (1, 1, 1), (1, 1, 1), 32, False, (0, 0, 0)),
    (16, 8, (5, 9, 8), (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), 2, True, (1, 0, 1)),
]


def _static(s, d, p, groups, transposed, op):
    return dict(stride=s, padding=tuple((q, q) for q in p), dilation=d, groups=groups, transposed=transposed,
                output_padding=op, padding_mode="zeros")  # fmt: skip


def check(g) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for cin, cout, size, k, s, d, p, groups, transposed, op in CASES:
            gen = torch.Generator(device=g.dev).manual_seed(0)
            wshape = (cin, cout // groups, *k) if transposed else (cout, cin // groups, *k)
            ins = [torch.randn(2, cin, *size, generator=gen, device=g.dev),
                   torch.randn(*wshape, generator=gen, device=g.dev) * 0.3,
                   torch.randn(cout, generator=gen, device=g.dev)]  # fmt: skip
            leaves = [t.to(dtype).requires_grad_() for t in ins]
            y = C.stationary_conv(*leaves, **_static(s, d, p, groups, transposed, op))
            dy = torch.randn_like(y)
            grads = torch.autograd.grad(y, leaves, dy)
            ref = [t.detach().double().requires_grad_() for t in leaves]  # the same (rounded) inputs, in float64
            if transposed:
                r = F.conv_transpose3d(*ref, s, p, op, groups, d)
            else:
                r = F.conv3d(*ref, s, p, d, groups)
            gr = torch.autograd.grad(r, ref, dy.double())
            errs = [g.rel(y, r)] + [g.rel(a, b) for a, b in zip(grads, gr)]
            kind = "depthwise" if groups == cin == cout else ("transposed" if transposed else f"groups{groups}")
            c = {"kernel": f"stationary conv3d {kind}", "dtype": str(dtype), "shape": [cin, cout, *size],
                 "max_rel_err": max(errs), "ok": max(errs) <= TOLS[dtype]}  # fmt: skip
            g.CHECKS.append(c)
            print(c, flush=True)
    g.save()


def speed(g, b=8, c=64, size=(16, 56, 56), c_dw=128) -> None:
    torch.backends.cudnn.benchmark = True
    dev, bf = g.dev, torch.bfloat16
    tag = f"B{b} C{c} {'x'.join(map(str, size))} k3 bf16"
    x = torch.randn(b, c, *size, device=dev, dtype=bf)
    w = torch.randn(c, c, 3, 3, 3, device=dev, dtype=bf) * 0.05
    fl = 2 * b * c * c * size[0] * size[1] * size[2] * 27
    xl, wl = x.to(memory_format=torch.channels_last_3d), w.to(memory_format=torch.channels_last_3d)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    xlg, wlg = xl.clone().requires_grad_(), wl.clone().requires_grad_()
    dy = torch.randn(b, c, *size, device=dev, dtype=bf)
    dyl = dy.to(memory_format=torch.channels_last_3d)
    base = g.bench(lambda: F.conv3d(x, w, padding=1))
    g.row(f"cudnn conv3d fwd {tag} (NCDHW)", base, fl)
    g.row(f"cudnn conv3d fwd {tag} (channels_last_3d)", g.bench(lambda: F.conv3d(xl, wl, padding=1)), fl)
    base_fb = g.bench(lambda: F.conv3d(xg, wg, padding=1).backward(dy))
    g.row(f"cudnn conv3d fwd+bwd {tag} (NCDHW)", base_fb, 3 * fl)
    g.row(f"cudnn conv3d fwd+bwd {tag} (channels_last_3d)",
          g.bench(lambda: F.conv3d(xlg, wlg, padding=1).backward(dyl)), 3 * fl)  # fmt: skip
    kw = _static((1, 1, 1), (1, 1, 1), (1, 1, 1), 1, False, (0, 0, 0))
    for bm, bn, bk, nw, st in ((128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 64, 4, 3)):
        cfg = dict(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=st)
        try:
            ms = g.bench(lambda: C.direct_conv(x, w, None, **kw, **cfg))
            g.row(f"itnet implicit-gemm conv3d fwd {tag}", ms, fl, config=cfg, vs_cudnn=round(base / ms, 3))
        except Exception as e:
            print("conv3d config failed", cfg, type(e).__name__, str(e)[:200])
    ms = g.bench(lambda: C.direct_conv(xg, wg, None, **kw).backward(dy))
    g.row(f"itnet implicit-gemm conv3d fwd+bwd {tag}", ms, 3 * fl, vs_cudnn=round(base_fb / ms, 3))

    xd = torch.randn(b, c_dw, *size, device=dev, dtype=bf)
    wd = torch.randn(c_dw, 1, 3, 3, 3, device=dev, dtype=bf)
    xdg, wdg = xd.clone().requires_grad_(), wd.clone().requires_grad_()
    dyd = torch.randn_like(xd)
    nbytes = 2 * xd.numel() * xd.element_size()  # read x, write y
    dtag = f"B{b} C{c_dw} {'x'.join(map(str, size))} k3 bf16"
    g.row(f"copy (clone) {dtag}", g.bench(lambda: xd.clone()), bytes_=nbytes)
    base = g.bench(lambda: F.conv3d(xd, wd, padding=1, groups=c_dw))
    g.row(f"cudnn depthwise conv3d fwd {dtag}", base, bytes_=nbytes)
    base_fb = g.bench(lambda: F.conv3d(xdg, wdg, padding=1, groups=c_dw).backward(dyd))
    g.row(f"cudnn depthwise conv3d fwd+bwd {dtag}", base_fb, bytes_=3 * nbytes)
    kw = _static((1, 1, 1), (1, 1, 1), (1, 1, 1), c_dw, False, (0, 0, 0))
    for bc, bl, nw in ((16, 128, 4), (8, 256, 4), (32, 128, 8)):
        cfg = dict(block_c=bc, block_l=bl, num_warps=nw)
        ms = g.bench(lambda: C.depthwise_conv(xd, wd, None, **kw, **cfg))
        g.row(f"itnet depthwise conv3d fwd {dtag}", ms, bytes_=nbytes, config=cfg, vs_cudnn=round(base / ms, 3))
    ms = g.bench(lambda: C.depthwise_conv(xdg, wdg, None, **kw).backward(dyd))
    g.row(f"itnet depthwise conv3d fwd+bwd {dtag}", ms, bytes_=3 * nbytes, vs_cudnn=round(base_fb / ms, 3))
