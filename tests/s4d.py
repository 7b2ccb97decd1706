"""An S4D model written from the S4D paper (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal
State Space Models"), and the module converters that capture its layer.

The layer: a diagonal complex A (S4D-Lin: A_n = -1/2 + iπn), per-channel step Δ = exp(log Δ), ZOH discretisation
Ā = exp(ΔA), B̄ = (exp(ΔA) - 1)/A · B, and the convolution kernel K_l = 2 Re Σ_n C_n B̄_n Ā_n^l of the sequence's own
length, applied by FFT as in the paper's reference code: y = K * u + D u. The model wraps it in the paper's block
(GELU, 1×1 conv to 2H, GLU, residual, post LayerNorm).

Two converters capture ``S4D``: ``convert_stationary`` (the time-invariant kernel generated from A, B, C, Δ by
generic ops, then one ``stationary`` node: a causal convolution whose kernel is as long as the sequence) and
``convert_ssm`` (the same layer as its recurrence: one time-invariant ``ssm`` node with complex state). Both only use
the public converter API.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import sympy
import torch
import torch.nn.functional as F
from torch import nn

import itnet_compiler as itc
from itnet_compiler.ir import ScalarType, SsmAttrs, StationaryAttrs, TensorType


class S4D(nn.Module):
    """[B, H, L] → [B, H, L]: the S4D convolution with the skip term (the paper's ``S4D`` minus activation/output)."""

    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 0.001, dt_max: float = 0.1):
        super().__init__()
        h, n = d_model, d_state // 2  # conjugate pairs: N/2 complex modes
        self.log_dt = nn.Parameter(torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(h, n)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(n, dtype=torch.float32).repeat(h, 1))
        self.B = nn.Parameter(torch.view_as_real(torch.ones(h, n, dtype=torch.cfloat)).clone())
        self.C = nn.Parameter(torch.view_as_real(torch.randn(h, n, dtype=torch.cfloat)).clone())
        self.D = nn.Parameter(torch.randn(h))

    def kernel(self, length: int) -> torch.Tensor:
        dt = torch.exp(self.log_dt)
        A = -torch.exp(self.log_A_real) + 1j * self.A_imag
        dtA = A * dt.unsqueeze(-1)
        vandermonde = dtA.unsqueeze(-1) * torch.arange(length, device=A.device)
        C = torch.view_as_complex(self.C) * torch.view_as_complex(self.B) * (torch.exp(dtA) - 1.0) / A
        return 2 * torch.einsum("hn,hnl->hl", C, torch.exp(vandermonde)).real

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        length = u.size(-1)
        k_f = torch.fft.rfft(self.kernel(length), n=2 * length)
        u_f = torch.fft.rfft(u, n=2 * length)
        y = torch.fft.irfft(u_f * k_f, n=2 * length)[..., :length]
        return y + u * self.D.unsqueeze(-1)


class S4DBlock(nn.Module):
    def __init__(self, d_model: int, d_state: int):
        super().__init__()
        self.s4d = S4D(d_model, d_state)
        self.out = nn.Conv1d(d_model, 2 * d_model, 1)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, L]
        z = F.glu(self.out(F.gelu(self.s4d(x))), dim=-2)
        return self.norm((z + x).transpose(-1, -2)).transpose(-1, -2)


class S4DModel(nn.Module):
    """[B, L, d_input] → [B, L, d_output]."""

    def __init__(self, d_input: int = 4, d_model: int = 16, d_state: int = 16, n_layers: int = 2, d_output: int = 4):
        super().__init__()
        self.encoder = nn.Linear(d_input, d_model)
        self.blocks = nn.ModuleList(S4DBlock(d_model, d_state) for _ in range(n_layers))
        self.decoder = nn.Linear(d_model, d_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x).transpose(-1, -2)
        for block in self.blocks:
            h = block(h)
        return self.decoder(h.transpose(-1, -2))


# ------------------------------------------------------------------------------------------------------ converters


def _t(dtype: torch.dtype, *dims: object) -> TensorType:
    return TensorType(dtype, tuple(sympy.Integer(d) if isinstance(d, int) else d for d in dims))


def _parameters(ctx: itc.ConverterContext, h: int, n: int) -> dict[str, itc.Value]:
    """Δ, A, B, C as the kernel formulas use them, written as generic ops over the layer's parameters."""
    f32, c64 = torch.float32, torch.complex64
    (dt,) = ctx.op("aten.exp.default", [ctx.weight("log_dt")], None, [_t(f32, h)])
    (a_re,) = ctx.op("aten.exp.default", [ctx.weight("log_A_real")], None, [_t(f32, h, n)])
    (a_re,) = ctx.op("aten.neg.default", [a_re], None, [_t(f32, h, n)])
    (a,) = ctx.op("aten.complex.default", [a_re, ctx.weight("A_imag")], None, [_t(c64, h, n)])
    (dt_col,) = ctx.op("aten.unsqueeze.default", [dt, -1], None, [_t(f32, h, 1)])
    (dta,) = ctx.op("aten.mul.Tensor", [a, dt_col], None, [_t(c64, h, n)])
    (b,) = ctx.op("aten.view_as_complex.default", [ctx.weight("B")], None, [_t(c64, h, n)])
    (c,) = ctx.op("aten.view_as_complex.default", [ctx.weight("C")], None, [_t(c64, h, n)])
    (zoh,) = ctx.op("aten.exp.default", [dta], None, [_t(c64, h, n)])
    (zoh,) = ctx.op("aten.sub.Tensor", [zoh, 1.0], None, [_t(c64, h, n)])
    return {"dt": dt, "A": a, "dtA": dta, "B": b, "C": c, "zoh": zoh}


def convert_stationary(ctx: itc.ConverterContext, module: S4D, u: itc.Value) -> itc.Value:
    """K_l = 2 Re Σ_n C_n B_n (exp(ΔA_n) - 1)/A_n exp(ΔA_n l), then y = causal conv(u, K) + D u."""
    f32, c64 = torch.float32, torch.complex64
    batch, h, length = u.type.shape
    h, n = int(h), module.log_A_real.shape[1]
    p = _parameters(ctx, h, n)
    (size,) = ctx.op("aten.sym_size.int", [u, 2], None, [ScalarType("int", length)])
    (steps,) = ctx.op("aten.arange.default", [size], {"dtype": f32, "device": module.D.device}, [_t(f32, length)])
    (dta,) = ctx.op("aten.unsqueeze.default", [p["dtA"], -1], None, [_t(c64, h, n, 1)])
    (vdm,) = ctx.op("aten.mul.Tensor", [dta, steps], None, [_t(c64, h, n, length)])
    (vdm,) = ctx.op("aten.exp.default", [vdm], None, [_t(c64, h, n, length)])
    (coef,) = ctx.op("aten.mul.Tensor", [p["C"], p["B"]], None, [_t(c64, h, n)])
    (coef,) = ctx.op("aten.mul.Tensor", [coef, p["zoh"]], None, [_t(c64, h, n)])
    (coef,) = ctx.op("aten.div.Tensor", [coef, p["A"]], None, [_t(c64, h, n)])
    (k,) = ctx.op("aten.einsum.default", ["hn,hnl->hl", [coef, vdm]], None, [_t(c64, h, length)])
    (k,) = ctx.op("aten.view_as_real.default", [k], None, [_t(f32, h, length, 2)])
    (k,) = ctx.op("aten.select.int", [k, -1, 0], None, [_t(f32, h, length)])
    (k,) = ctx.op("aten.mul.Tensor", [k, 2], None, [_t(f32, h, length)])
    # torch convolutions correlate: the causal kernel enters reversed, the input padded by L - 1 on the left
    (w,) = ctx.op("aten.flip.default", [k, [-1]], None, [_t(f32, h, length)])
    (w,) = ctx.op("aten.unsqueeze.default", [w, 1], None, [_t(f32, h, 1, length)])
    (pad,) = ctx.op("operator.sub", [size, 1], None, [ScalarType("int", length - 1)])
    (up,) = ctx.op("aten.constant_pad_nd.default", [u, [pad, 0], 0.0], None, [_t(f32, batch, h, 2 * length - 1)])
    attrs = StationaryAttrs(rank=1, stride=(1,), padding=((0, 0),), dilation=(1,), output_padding=(0,), groups=h)
    (y,) = ctx.transform(attrs, {"x": up, "weight": w}, [u.type])
    (d,) = ctx.op("aten.unsqueeze.default", [ctx.weight("D"), -1], None, [_t(f32, h, 1)])
    (skip,) = ctx.op("aten.mul.Tensor", [u, d], None, [u.type])
    return ctx.op("aten.add.Tensor", [y, skip], None, [u.type])[0]


def convert_ssm(ctx: itc.ConverterContext, module: S4D, u: itc.Value) -> itc.Value:
    """h_l = exp(ΔA) h_{l-1} + Δ B' u_l with B' = B (exp(ΔA) - 1)/(ΔA) (ZOH), y_l = Re(2C)ᵀ h_l + D u_l."""
    f32, c64 = torch.float32, torch.complex64
    batch, h, length = u.type.shape
    h, n = int(h), module.log_A_real.shape[1]
    p = _parameters(ctx, h, n)
    (b,) = ctx.op("aten.mul.Tensor", [p["B"], p["zoh"]], None, [_t(c64, h, n)])
    (b,) = ctx.op("aten.div.Tensor", [b, p["dtA"]], None, [_t(c64, h, n)])
    (c,) = ctx.op("aten.mul.Tensor", [p["C"], 2], None, [_t(c64, h, n)])
    (x,) = ctx.op("aten.transpose.int", [u, 1, 2], None, [_t(f32, batch, length, h)])
    (x,) = ctx.op("aten.unsqueeze.default", [x, -1], None, [_t(f32, batch, length, h, 1)])
    attrs = SsmAttrs(heads=h, head_dim=1, groups=h, state_size=n, selective=False, chunk=64)
    roles = {"x": x, "dt": p["dt"], "A": p["A"], "B": b, "C": c, "D": ctx.weight("D")}
    (y,) = ctx.transform(attrs, roles, [x.type])
    (y,) = ctx.op("aten.squeeze.dim", [y, -1], None, [_t(f32, batch, length, h)])
    return ctx.op("aten.transpose.int", [y, 1, 2], None, [u.type])[0]


CONVERTERS = {"stationary": convert_stationary, "ssm": convert_ssm}


@contextlib.contextmanager
def captured_as(form: str) -> Iterator[None]:
    """Register the ``form`` converter for ``S4D`` for the duration of the block."""
    itc.register_converter(S4D)(CONVERTERS[form])
    try:
        yield
    finally:
        itc.unregister_converter(S4D)
