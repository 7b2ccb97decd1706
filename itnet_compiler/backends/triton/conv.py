"""Triton lowering of ``stationary`` for depthwise convolutions (1-d and 2-d; causal, strided, dilated, any zero
padding): forward and backward kernels rendered from ``templates.DEPTHWISE``.

Depthwise convolution is memory-bound (a few taps per element), so the kernel streams [channels × positions] tiles and
keeps the taps in registers. Grouped and dense convolutions run on the torch backend (recorded as a fallback).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import loader, templates


@dataclass(frozen=True)
class DepthwiseOptions:
    block_c: int = 16
    block_l: int = 128
    num_warps: int = 4

    @staticmethod
    def default(device: torch.device) -> DepthwiseOptions:
        return DepthwiseOptions(16, 128, 4) if device.type == "cuda" else DepthwiseOptions(8, 32, 1)


def kernels():
    source = loader.render(
        templates.DEPTHWISE, {"TITLE": "stationary depthwise direct", "KERNEL": templates.STATIONARY_DEPTHWISE_KERNEL}
    )
    return loader.load("stationary_depthwise", source)


def _as2d(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(2) if t.dim() == 3 else t


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """[C, 1, *k] -> [C, KH, KW]."""
    w = weight[:, 0]
    return w.unsqueeze(1) if w.dim() == 2 else w


@dataclass(frozen=True)
class _Geom:
    stride: tuple[int, int]
    pad: tuple[int, int]
    dil: tuple[int, int]
    k: tuple[int, int]

    def constexprs(self) -> dict[str, int]:
        return dict(SH=self.stride[0], SW=self.stride[1], PH=self.pad[0], PW=self.pad[1], DH=self.dil[0],
                    DW=self.dil[1], KH=self.k[0], KW=self.k[1])  # fmt: skip


def _geom(weight: torch.Tensor, stride, padding, dilation) -> _Geom:
    if weight.dim() == 3:
        return _Geom((1, stride[0]), (0, padding[0][0]), (1, dilation[0]), (1, weight.shape[-1]))
    return _Geom(tuple(stride), (padding[0][0], padding[1][0]), tuple(dilation), tuple(weight.shape[-2:]))


def _out_size(size: int, lo: int, hi: int, d: int, k: int, s: int) -> int:
    return (size + lo + hi - d * (k - 1) - 1) // s + 1


class _Depthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, opts):
        rank = x.dim() - 2
        g = _geom(weight, stride, padding, dilation)
        x2, w2 = _as2d(x), _taps(weight)
        n, c, h, w = x2.shape
        pads = padding if rank == 2 else ((0, 0), padding[0])
        oh = _out_size(h, *pads[0], g.dil[0], g.k[0], g.stride[0])
        ow = _out_size(w, *pads[1], g.dil[1], g.k[1], g.stride[1])
        y = torch.empty(n, c, oh, ow, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(oh * ow, opts.block_l), triton.cdiv(c, opts.block_c), n)
        b = bias if bias is not None else w2
        kernels().dw_fwd[grid](
            x2, w2, b, y, c, h, w, oh, ow, *x2.stride(), *w2.stride(), *y.stride(), **g.constexprs(),
            HAS_BIAS=bias is not None, BLOCK_C=opts.block_c, BLOCK_L=opts.block_l, num_warps=opts.num_warps,
        )  # fmt: skip
        ctx.save_for_backward(x, weight)
        ctx.meta = (g, opts, bias is not None, rank)
        return y.squeeze(2) if rank == 1 else y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        g, opts, has_bias, rank = ctx.meta
        x2, w2, dy2 = _as2d(x), _taps(weight), _as2d(dy.contiguous())
        n, c, h, w = x2.shape
        oh, ow = dy2.shape[2:]
        mod = kernels()
        dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        mod.dw_bwd_dx[(triton.cdiv(h * w, opts.block_l), triton.cdiv(c, opts.block_c), n)](
            dy2, w2, dx, c, h, w, oh, ow, *dy2.stride(), *w2.stride(), *dx.stride(), **g.constexprs(),
            BLOCK_C=opts.block_c, BLOCK_L=opts.block_l, num_warps=opts.num_warps,
        )  # fmt: skip
        nblk = triton.cdiv(oh * ow, opts.block_l)
        part = torch.empty(n * nblk, c, g.k[0] * g.k[1], dtype=torch.float32, device=x.device)
        mod.dw_bwd_dw[(nblk, triton.cdiv(c, opts.block_c), n)](
            x2, dy2, part, c, h, w, oh, ow, nblk, *x2.stride(), *dy2.stride(), **g.constexprs(),
            BLOCK_C=opts.block_c, BLOCK_L=opts.block_l, num_warps=opts.num_warps,
        )  # fmt: skip
        dw = part.sum(0).view(weight.shape).to(weight.dtype)
        db = dy2.sum((0, 2, 3)).to(dy.dtype) if has_bias else None
        return (dx.squeeze(2) if rank == 1 else dx), dw, db, None, None, None, None


def supported(x, weight, *, groups, transposed, padding_mode, **_: object) -> str | None:
    if transposed:
        return "transposed convolution has no Triton kernel yet"
    if x.dim() not in (3, 4):
        return "only 1-d and 2-d convolutions have a Triton kernel"
    if groups != x.shape[1] or weight.shape[0] != groups:
        return "only depthwise convolutions (groups = channels, multiplier 1) have a Triton kernel"
    return None


def depthwise_conv(x, weight, bias=None, *, stride, padding, dilation, groups, transposed, output_padding,
                   padding_mode, **overrides):  # fmt: skip
    if padding_mode != "zeros":  # reflect/replicate/circular: materialise the border, then a zero-padded kernel
        pads = [p for lo_hi in reversed(padding) for p in lo_hi]
        x = torch.nn.functional.pad(x, pads, mode=padding_mode)
        padding = tuple((0, 0) for _ in padding)
    opts = DepthwiseOptions.default(x.device)
    if overrides:
        opts = DepthwiseOptions(**{**opts.__dict__, **{k: int(v) for k, v in overrides.items()}})
    return _Depthwise.apply(x, weight, bias, tuple(stride), tuple(tuple(p) for p in padding), tuple(dilation), opts)
