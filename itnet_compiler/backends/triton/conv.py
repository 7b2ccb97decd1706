"""Triton lowering of ``stationary`` (1-d, 2-d and 3-d convolutions; causal, strided, dilated, grouped, transposed,
any padding): forward and backward kernels rendered from ``templates.DEPTHWISE`` and ``templates.IMPLICIT_GEMM``.

The kernels are written for a 3-d grid; tensors of a 1-d or 2-d layer are viewed as 3-d with size-1 leading dims
(``_lift``) and the geometry is padded the same way, so there is one copy of every kernel. Depthwise convolution is
memory-bound (a few taps per element), so its kernel streams [channels × positions] tiles and keeps the taps in
registers; dense and grouped ones are implicit GEMMs. Non-zero padding modes are materialised by torch first.
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
    def default(device: torch.device, rank: int = 2) -> DepthwiseOptions:
        if device.type != "cuda":
            return DepthwiseOptions(8, 32, 1)
        # 27 taps per point in 3-d: fewer channels, longer rows per tile (measured on an H100, C128 16x56x56 bf16)
        return DepthwiseOptions(8, 256, 4) if rank == 3 else DepthwiseOptions(16, 128, 4)


def kernels():
    source = loader.render(
        templates.DEPTHWISE, {"TITLE": "stationary depthwise direct", "KERNEL": templates.STATIONARY_DEPTHWISE_KERNEL}
    )
    return loader.load("stationary_depthwise", source)


def _lift(t: torch.Tensor) -> torch.Tensor:
    """[N, C, *s] -> [N, C, D, H, W]: a 1-d or 2-d grid is the 3-d one with size-1 leading dims."""
    while t.dim() < 5:
        t = t.unsqueeze(2)
    return t


def _drop(t: torch.Tensor, rank: int) -> torch.Tensor:
    """Inverse of ``_lift`` for a tensor of the given spatial rank."""
    return t.reshape(*t.shape[:2], *t.shape[5 - rank :])


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """[C, 1, *k] -> [C, KD, KH, KW]."""
    return _lift(weight)[:, 0]


@dataclass(frozen=True)
class _Geom:
    """Per spatial dim (D, H, W): stride, (low, high) zero padding, dilation, kernel size."""

    stride: tuple[int, int, int]
    pads: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    dil: tuple[int, int, int]
    k: tuple[int, int, int]

    def constexprs(self) -> dict[str, int]:
        (sd, sh, sw), (dd, dh, dw), (kd, kh, kw) = self.stride, self.dil, self.k
        pd, ph, pw = (lo for lo, _ in self.pads)
        return dict(SD=sd, SH=sh, SW=sw, PD=pd, PH=ph, PW=pw, DD=dd, DH=dh, DW=dw, KD=kd, KH=kh, KW=kw)

    def out_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(_out_size(size[i], *self.pads[i], self.dil[i], self.k[i], self.stride[i]) for i in range(3))

    def transposed_size(self, size: tuple[int, ...], output_padding: tuple[int, ...]) -> tuple[int, ...]:
        return tuple((size[i] - 1) * self.stride[i] - 2 * self.pads[i][0] + self.dil[i] * (self.k[i] - 1)
                     + output_padding[i] + 1 for i in range(3))  # fmt: skip


def _geom(weight: torch.Tensor, stride, padding, dilation) -> _Geom:
    lead = 5 - weight.dim()
    return _Geom((1,) * lead + tuple(stride), ((0, 0),) * lead + tuple(tuple(p) for p in padding),
                 (1,) * lead + tuple(dilation), tuple(_lift(weight).shape[2:]))  # fmt: skip


def _out_size(size: int, lo: int, hi: int, d: int, k: int, s: int) -> int:
    return (size + lo + hi - d * (k - 1) - 1) // s + 1


class _Depthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, opts):
        rank = x.dim() - 2
        g = _geom(weight, stride, padding, dilation)
        x3, w3 = _lift(x), _taps(weight)
        n, c, d, h, w = x3.shape
        od, oh, ow = g.out_size((d, h, w))
        y = torch.empty(n, c, od, oh, ow, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(oh * ow, opts.block_l), triton.cdiv(c, opts.block_c), n * od)
        b = bias if bias is not None else w3
        kernels().dw_fwd[grid](
            x3, w3, b, y, c, d, h, w, od, oh, ow, *x3.stride(), *w3.stride(), *y.stride(), **g.constexprs(),
            HAS_BIAS=bias is not None, ONE_D=rank == 1, BLOCK_C=opts.block_c, BLOCK_L=opts.block_l,
            num_warps=opts.num_warps,
        )  # fmt: skip
        ctx.save_for_backward(x, weight)
        ctx.meta = (g, opts, bias is not None, rank)
        return _drop(y, rank)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        g, opts, has_bias, rank = ctx.meta
        x3, w3, dy3 = _lift(x), _taps(weight), _lift(dy.contiguous())
        n, c, d, h, w = x3.shape
        od, oh, ow = dy3.shape[2:]
        mod = kernels()
        dx = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
        mod.dw_bwd_dx[(triton.cdiv(h * w, opts.block_l), triton.cdiv(c, opts.block_c), n * d)](
            dy3, w3, dx, c, d, h, w, od, oh, ow, *dy3.stride(), *w3.stride(), *dx.stride(), **g.constexprs(),
            BLOCK_C=opts.block_c, BLOCK_L=opts.block_l, num_warps=opts.num_warps,
        )  # fmt: skip
        nblk = triton.cdiv(oh * ow, opts.block_l)
        part = torch.empty(n * od * nblk, c, g.k[0] * g.k[1] * g.k[2], dtype=torch.float32, device=x.device)
        mod.dw_bwd_dw[(nblk, triton.cdiv(c, opts.block_c), n * od)](
            x3, dy3, part, c, d, h, w, od, oh, ow, nblk, *x3.stride(), *dy3.stride(), **g.constexprs(),
            BLOCK_C=opts.block_c, BLOCK_L=opts.block_l, num_warps=opts.num_warps,
        )  # fmt: skip
        dw = part.sum(0).view(weight.shape).to(weight.dtype)
        db = dy3.sum((0, 2, 3, 4)).to(dy.dtype) if has_bias else None
        return _drop(dx, rank), dw, db, None, None, None, None


@dataclass(frozen=True)
class GemmOptions:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0  # weight gradient: programs splitting its K = N·OD·OH·OW; 0 picks enough to fill the device

    @staticmethod
    def default(device: torch.device) -> GemmOptions:
        return GemmOptions() if device.type == "cuda" else GemmOptions(32, 32, 32, 1, 1)


def gemm_kernels():
    source = loader.render(
        templates.IMPLICIT_GEMM, {"TITLE": "stationary implicit GEMM", "KERNEL": templates.STATIONARY_GEMM_KERNEL}
    )
    return loader.load("stationary_gemm", source)


def _geom_kw(g: _Geom, dtype: torch.dtype) -> dict[str, object]:
    return {**g.constexprs(), "PREC": loader.dot_precision(dtype)}


def _launch(name: str, grid_m: int, grid_n: int, grid_z: int, opts: GemmOptions, *args, **kw) -> None:
    grid = (triton.cdiv(grid_m, opts.block_m), triton.cdiv(grid_n, opts.block_n), grid_z)
    blocks = dict(BLOCK_M=opts.block_m, BLOCK_N=opts.block_n, BLOCK_K=opts.block_k)
    getattr(gemm_kernels(), name)[grid](*args, **kw, **blocks, num_warps=opts.num_warps, num_stages=opts.num_stages)


def _fwd(x3, w5, bias, out_dhw, g: _Geom, groups: int, opts: GemmOptions) -> torch.Tensor:
    n, cin, d, h, w = x3.shape
    co = w5.shape[0] // groups
    od, oh, ow = out_dhw
    y = torch.empty(n, co * groups, od, oh, ow, dtype=x3.dtype, device=x3.device)
    _launch("conv_fwd", n * od * oh * ow, co, groups, opts, x3, w5, bias if bias is not None else w5, y, n, d, h, w,
            od, oh, ow, cin // groups, co, *x3.stride(), *w5.stride(), *y.stride(), HAS_BIAS=bias is not None,
            **_geom_kw(g, x3.dtype))  # fmt: skip
    return y


def _dgrad(dy3, w5, in_dhw, g: _Geom, groups: int, opts: GemmOptions) -> torch.Tensor:
    n, cout, od, oh, ow = dy3.shape
    d, h, w = in_dhw
    ci = w5.shape[1]
    dx = torch.empty(n, ci * groups, d, h, w, dtype=dy3.dtype, device=dy3.device)
    _launch("conv_dgrad", n * d * h * w, ci, groups, opts, dy3, w5, dx, n, d, h, w, od, oh, ow, ci, cout // groups,
            *dy3.stride(), *w5.stride(), *dx.stride(), **_geom_kw(g, dy3.dtype))  # fmt: skip
    return dx


def _split_k(programs: int, k_steps: int, opts: GemmOptions, device: torch.device) -> int:
    """How many programs share the weight gradient's K loop: about 4 waves of the device, each ≥ 16 K steps."""
    if opts.split_k:
        return max(1, min(opts.split_k, k_steps))
    if device.type != "cuda":
        return 1
    waves = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(waves // programs, k_steps // 16, 64))


def _wgrad(x3, dy3, wshape, g: _Geom, groups: int, opts: GemmOptions) -> torch.Tensor:
    n, cin, d, h, w = x3.shape
    od, oh, ow = dy3.shape[2:]
    co, ci, kd, kh, kw = wshape[0] // groups, *wshape[1:]
    programs = triton.cdiv(co, opts.block_m) * triton.cdiv(ci * kh * kw, opts.block_n) * groups * kd
    k_steps = triton.cdiv(n * oh * ow, opts.block_k)
    split = _split_k(programs, k_steps, opts, x3.device)
    k_per_split = triton.cdiv(k_steps, split) * opts.block_k
    part = torch.empty(split, *wshape, dtype=torch.float32, device=x3.device)
    _launch("conv_wgrad", co, ci * kh * kw, groups * kd * split, opts, x3, dy3, part, n, d, h, w, od, oh, ow, ci, co,
            split, k_per_split, *x3.stride(), *dy3.stride(), *part.stride(), **_geom_kw(g, x3.dtype))  # fmt: skip
    return part[0] if split == 1 else part.sum(0)


class _Direct(torch.autograd.Function):
    """Grouped/dense convolution (and transposed convolution) through the implicit-GEMM kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, transposed, output_padding, opts):
        rank = x.dim() - 2
        g = _geom(weight, stride, padding, dilation)
        x3, w5 = _lift(x), _lift(weight)
        if transposed:
            outp = (0,) * (3 - rank) + tuple(output_padding)
            y = _dgrad(x3, w5, g.transposed_size(x3.shape[2:], outp), g, groups, opts)
            if bias is not None:
                y = y + bias.view(1, -1, 1, 1, 1).to(y.dtype)
        else:
            y = _fwd(x3, w5, bias, g.out_size(x3.shape[2:]), g, groups, opts)
        ctx.save_for_backward(x, weight)
        ctx.meta = (g, groups, transposed, bias is not None, rank, opts)
        return _drop(y, rank)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        g, groups, transposed, has_bias, rank, opts = ctx.meta
        x3, w5, dy3 = _lift(x), _lift(weight), _lift(dy.contiguous())
        if transposed:  # y = dgrad(x, w): dx = fwd(dy, w), dw = wgrad(dy as input, x as output grad)
            dx = _fwd(dy3, w5, None, tuple(x3.shape[2:]), g, groups, opts)
            dw = _wgrad(dy3, x3, w5.shape, g, groups, opts)
        else:
            dx = _dgrad(dy3, w5, tuple(x3.shape[2:]), g, groups, opts)
            dw = _wgrad(x3, dy3, w5.shape, g, groups, opts)
        db = dy3.sum((0, 2, 3, 4)).to(dy.dtype) if has_bias else None
        return _drop(dx, rank), dw.view(weight.shape).to(weight.dtype), db, None, None, None, None, None, None, None


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
    if x.dim() not in (3, 4, 5):
        return "only 1-d, 2-d and 3-d convolutions have a Triton kernel"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype}"
    return None


def stationary_conv(x, weight, bias=None, **static):
    """Dispatch: depthwise kernel for depthwise layers, implicit GEMM for the rest."""
    dw_keys = {"block_c", "block_l", "num_warps"}
    gemm_keys = {"block_m", "block_n", "block_k", "num_warps", "num_stages", "split_k"}
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
    opts = DepthwiseOptions.default(x.device, x.dim() - 2)
    if overrides:
        opts = DepthwiseOptions(**{**opts.__dict__, **{k: int(v) for k, v in overrides.items()}})
    return _Depthwise.apply(x, weight, bias, tuple(stride), tuple(tuple(p) for p in padding), tuple(dilation), opts)
