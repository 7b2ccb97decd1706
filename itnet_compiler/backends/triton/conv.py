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
            HAS_BIAS=bias is not None, ONE_D=rank == 1, BLOCK_C=opts.block_c, BLOCK_L=opts.block_l,
            num_warps=opts.num_warps,
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


@dataclass(frozen=True)
class GemmOptions:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3

    @staticmethod
    def default(device: torch.device) -> GemmOptions:
        return GemmOptions() if device.type == "cuda" else GemmOptions(32, 32, 32, 1, 1)


def gemm_kernels():
    source = loader.render(
        templates.IMPLICIT_GEMM, {"TITLE": "stationary implicit GEMM", "KERNEL": templates.STATIONARY_GEMM_KERNEL}
    )
    return loader.load("stationary_gemm", source)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _geom_kw(g: _Geom, dtype: torch.dtype) -> dict[str, object]:
    return {**g.constexprs(), "PREC": _prec(dtype)}


def _w4(weight: torch.Tensor) -> torch.Tensor:
    return weight.unsqueeze(2) if weight.dim() == 3 else weight


def _launch(name: str, grid_m: int, grid_n: int, groups: int, opts: GemmOptions, *args, **kw) -> None:
    grid = (triton.cdiv(grid_m, opts.block_m), triton.cdiv(grid_n, opts.block_n), groups)
    getattr(gemm_kernels(), name)[grid](*args, **kw, BLOCK_M=opts.block_m, BLOCK_N=opts.block_n,
                                        BLOCK_K=opts.block_k, num_warps=opts.num_warps, num_stages=opts.num_stages)


def _fwd(x2, w4, bias, out_hw, g: _Geom, groups: int, opts: GemmOptions) -> torch.Tensor:
    n, cin, h, w = x2.shape
    co = w4.shape[0] // groups
    oh, ow = out_hw
    y = torch.empty(n, co * groups, oh, ow, dtype=x2.dtype, device=x2.device)
    _launch("conv_fwd", n * oh * ow, co, groups, opts, x2, w4, bias if bias is not None else w4, y, n, h, w, oh, ow,
            cin // groups, co, *x2.stride(), *w4.stride(), *y.stride(), HAS_BIAS=bias is not None,
            **_geom_kw(g, x2.dtype))  # fmt: skip
    return y


def _dgrad(dy2, w4, in_hw, g: _Geom, groups: int, opts: GemmOptions) -> torch.Tensor:
    n, cout, oh, ow = dy2.shape
    h, w = in_hw
    ci = w4.shape[1]
    dx = torch.empty(n, ci * groups, h, w, dtype=dy2.dtype, device=dy2.device)
    _launch("conv_dgrad", n * h * w, ci, groups, opts, dy2, w4, dx, n, h, w, oh, ow, ci, cout // groups,
            *dy2.stride(), *w4.stride(), *dx.stride(), **_geom_kw(g, dy2.dtype))  # fmt: skip
    return dx


def _wgrad(x2, dy2, wshape, g: _Geom, groups: int, opts: GemmOptions) -> torch.Tensor:
    n, cin, h, w = x2.shape
    oh, ow = dy2.shape[2:]
    dw = torch.empty(wshape, dtype=torch.float32, device=x2.device)
    co = wshape[0] // groups
    ci = wshape[1]
    _launch("conv_wgrad", co, ci * wshape[2] * wshape[3], groups, opts, x2, dy2, dw, n, h, w, oh, ow, ci, co,
            *x2.stride(), *dy2.stride(), *dw.stride(), **_geom_kw(g, x2.dtype))  # fmt: skip
    return dw


class _Direct(torch.autograd.Function):
    """Grouped/dense convolution (and transposed convolution) through the implicit-GEMM kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, transposed, output_padding, opts):
        rank = x.dim() - 2
        g = _geom(weight, stride, padding, dilation)
        x2, w4 = _as2d(x), _w4(weight)
        pads = padding if rank == 2 else ((0, 0), padding[0])
        outp = output_padding if rank == 2 else (0, output_padding[0])
        if transposed:
            out_hw = tuple(
                (x2.shape[2 + i] - 1) * g.stride[i] - 2 * pads[i][0] + g.dil[i] * (g.k[i] - 1) + outp[i] + 1
                for i in range(2)
            )
            y = _dgrad(x2, w4, out_hw, g, groups, opts)
            if bias is not None:
                y = y + bias.view(1, -1, 1, 1).to(y.dtype)
        else:
            out_hw = tuple(_out_size(x2.shape[2 + i], *pads[i], g.dil[i], g.k[i], g.stride[i]) for i in range(2))
            y = _fwd(x2, w4, bias, out_hw, g, groups, opts)
        ctx.save_for_backward(x, weight)
        ctx.meta = (g, groups, transposed, bias is not None, rank, opts)
        return y.squeeze(2) if rank == 1 else y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        g, groups, transposed, has_bias, rank, opts = ctx.meta
        x2, w4, dy2 = _as2d(x), _w4(weight), _as2d(dy.contiguous())
        if transposed:  # y = dgrad(x, w): dx = fwd(dy, w), dw = wgrad(dy as input, x as output grad)
            dx = _fwd(dy2, w4, None, tuple(x2.shape[2:]), g, groups, opts)
            dw = _wgrad(dy2, x2, w4.shape, g, groups, opts)
        else:
            dx = _dgrad(dy2, w4, tuple(x2.shape[2:]), g, groups, opts)
            dw = _wgrad(x2, dy2, w4.shape, g, groups, opts)
        db = dy2.sum((0, 2, 3)).to(dy.dtype) if has_bias else None
        dx = dx.squeeze(2) if rank == 1 else dx
        return dx, dw.view(weight.shape).to(weight.dtype), db, None, None, None, None, None, None, None


def direct_conv(x, weight, bias=None, *, stride, padding, dilation, groups, transposed, output_padding,
                padding_mode, **overrides):  # fmt: skip
    if padding_mode != "zeros":
        pads = [p for lo_hi in reversed(padding) for p in lo_hi]
        x = torch.nn.functional.pad(x, pads, mode=padding_mode)
        padding = tuple((0, 0) for _ in padding)
    opts = GemmOptions.default(x.device)
    if overrides:
        opts = GemmOptions(**{**opts.__dict__, **{k: int(v) for k, v in overrides.items()}})
    return _Direct.apply(x, weight, bias, tuple(stride), tuple(tuple(p) for p in padding), tuple(dilation), groups,
                         transposed, tuple(output_padding), opts)  # fmt: skip


def is_depthwise(x: torch.Tensor, weight: torch.Tensor, groups: int, transposed: bool) -> bool:
    return not transposed and groups == x.shape[1] and weight.shape[0] == groups


def supported(x, weight, *, groups, transposed, padding_mode, **_: object) -> str | None:
    if x.dim() not in (3, 4):
        return "only 1-d and 2-d convolutions have a Triton kernel"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype}"
    return None


def stationary_conv(x, weight, bias=None, **static):
    """Dispatch: depthwise kernel for depthwise layers, implicit GEMM for the rest."""
    dw_keys = {"block_c", "block_l", "num_warps"}
    gemm_keys = {"block_m", "block_n", "block_k", "num_warps", "num_stages"}
    geometry = ("stride", "padding", "dilation", "groups", "transposed", "output_padding", "padding_mode")
    base = {k: static[k] for k in geometry}
    if is_depthwise(x, weight, static["groups"], static["transposed"]):
        return depthwise_conv(x, weight, bias, **base, **{k: v for k, v in static.items() if k in dw_keys})
    return direct_conv(x, weight, bias, **base, **{k: v for k, v in static.items() if k in gemm_keys})


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
