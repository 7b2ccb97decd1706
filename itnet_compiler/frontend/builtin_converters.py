"""Built-in module converters: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and transformers' ``MambaMixer`` and ``Mamba2Mixer``.

Why converters and not tracing: torch.export unrolls an LSTM over time (and refuses a dynamic length for it), and the
HF Mamba CPU path is a Python loop over time (Mamba2's pads to whole chunks with a branch on the length); traced, each
would become thousands of ops specialised to one length. Each converter writes the layer's math instead:

- ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` → one ``gated`` node per module carrying every layer and direction
  (``ir/recurrent.py`` says why), outputs exactly torch's (output, h_n[, c_n]); initial states are the optional roles.
- ``MambaMixer`` → in_proj, x_proj, dt_proj, out_proj and the gating as generic ATen ops, the depthwise causal conv1d
  as a ``stationary`` node and the selective scan as an ``ssm`` node (A [D, N] diagonal, one head per channel).
- ``Mamba2Mixer`` → the same with SSD heads (A scalar per head, ``n_groups`` groups of B and C, ``chunk_size`` kept as
  the chunked lowering's default) and the gated grouped RMSNorm as generic ops.
- any module of either mixer's structure, whatever its class (``mamba_structure`` says what is checked): FalconMamba's
  and Jamba's mixers, whose RMS norms on dt, B and C become generic ops, and users' copies.

Every converter also registers a ``shapes`` function, which export runs on fake tensors instead of the module's
forward, so that no length is specialised. Only parameter names and the mixers' own size attributes are read, which
have stayed the same across transformers 5.x; the mixers are registered by qualified class name, so transformers is
never imported by itnet.
"""

from __future__ import annotations

import inspect
import math

import sympy
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import ItnetError
from ..ir.core import Value
from ..ir.families import StationaryAttrs
from ..ir.recurrent import CELLS, GatedAttrs, SsmAttrs
from ..ir.types import TensorType
from .converters import ConverterContext, register_converter, register_structural_converter
from .mamba_structure import ACTIVATIONS, MAMBA_NORMS, RmsNorm, is_mamba2_mixer, is_mamba_mixer, mamba_norms


def _register(cls: type[nn.Module] | str, shapes):
    """``register_converter(cls, shapes=...)`` where the registry takes a ``shapes`` function (and qualified-name
    keys); on a registry without them the converter alone, which then converts static lengths only."""
    if "shapes" in inspect.signature(register_converter).parameters:
        return register_converter(cls, shapes=shapes)
    return register_converter(cls)


def bind_inputs(ctx: ConverterContext, module: nn.Module, inputs: tuple[Value, ...]) -> dict[str, object]:
    """The module call's arguments by parameter name, with IR values in place of its tensors."""
    values = iter(inputs)
    leaves = [next(values) if isinstance(x, torch.Tensor) else x for x in ctx.cap.leaves]
    args, kwargs = pytree.tree_unflatten(leaves, ctx.cap.in_spec)
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    return {**bound.arguments, **bound.arguments.get("kwargs", {})}


# ------------------------------------------------------------------------------------------------- typed emission


def _dims(*dims: object) -> tuple[sympy.Expr, ...]:
    return tuple(sympy.Integer(d) if isinstance(d, int) else d for d in dims)


def _broadcast(a: tuple, b: tuple) -> tuple:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else sympy.Integer(1)
        y = b[-i] if i <= len(b) else sympy.Integer(1)
        out.append(y if x == 1 else x)
    return tuple(reversed(out))


class _Emit:
    """Generic ATen ops with their result types worked out from the argument types (dtype and symbolic shape)."""

    def __init__(self, ctx: ConverterContext):
        self.ctx = ctx

    def op(self, name: str, args: list[object], dtype: torch.dtype, shape: tuple, **kwargs: object) -> Value:
        return self.ctx.op(name, args, kwargs, [TensorType(dtype, _dims(*shape))])[0]

    def weight(self, module: nn.Module, path: str) -> Value | None:
        """``ctx.weight(path)`` if the submodule has that parameter (a bias may be None), else None."""
        owner, _, leaf = path.rpartition(".")
        mod = module.get_submodule(owner) if owner else module
        return self.ctx.weight(path) if getattr(mod, leaf, None) is not None else None

    def unary(self, name: str, x: Value, *args: object) -> Value:
        return self.op(name, [x, *args], x.type.dtype, x.type.shape)

    def binary(self, name: str, a: Value, b: Value | float) -> Value:
        shape = _broadcast(a.type.shape, b.type.shape) if isinstance(b, Value) else a.type.shape
        return self.op(name, [a, b], a.type.dtype, shape)

    def cast(self, x: Value, dtype: torch.dtype) -> Value:
        return x if x.type.dtype == dtype else self.op("aten._to_copy.default", [x], dtype, x.type.shape, dtype=dtype)

    def linear(self, x: Value, w: Value, b: Value | None = None) -> Value:
        return self.op("aten.linear.default", [x, w, b], x.type.dtype, (*x.type.shape[:-1], w.type.shape[0]))

    def transpose(self, x: Value, d0: int, d1: int) -> Value:
        shape = list(x.type.shape)
        shape[d0], shape[d1] = shape[d1], shape[d0]
        return self.op("aten.transpose.int", [x, d0, d1], x.type.dtype, tuple(shape))

    def split(self, x: Value, sizes: list[int]) -> list[Value]:
        """Split the last axis."""
        types = [TensorType(x.type.dtype, _dims(*x.type.shape[:-1], s)) for s in sizes]
        return self.ctx.op("aten.split_with_sizes.default", [x, sizes, -1], None, types)

    def unsqueeze(self, x: Value, dim: int) -> Value:
        shape = list(x.type.shape)
        shape.insert(dim % (len(shape) + 1), sympy.Integer(1))
        return self.op("aten.unsqueeze.default", [x, dim], x.type.dtype, tuple(shape))

    def unflatten(self, x: Value, sizes: list[int]) -> Value:
        """Split the last axis into ``sizes``."""
        return self.op("aten.unflatten.int", [x, -1, sizes], x.type.dtype, (*x.type.shape[:-1], *sizes))

    def flatten_last(self, x: Value, n: int) -> Value:
        """Merge the last ``n`` axes."""
        rank = x.type.rank
        merged = sympy.Mul(*x.type.shape[rank - n :])
        return self.op("aten.flatten.using_ints", [x, rank - n, rank - 1], x.type.dtype, (*x.type.shape[:-n], merged))

    def mask_padding(self, x: Value, mask: Value | None) -> Value:
        """HF's ``apply_mask_to_padding_states``: zero the padded positions of [B, L, C] states."""
        if mask is None:
            return x
        m = self.op("aten.unsqueeze.default", [mask, 2], mask.type.dtype, (*mask.type.shape, 1))
        y = self.op("aten.mul.Tensor", [x, m], torch.promote_types(x.type.dtype, mask.type.dtype), x.type.shape)
        return self.cast(y, x.type.dtype)

    def causal_depthwise_conv(self, x: Value, conv: nn.Conv1d, prefix: str) -> Value:
        """[B, C, L] → [B, C, L]: a ``stationary`` node padded K-1 on the left, as HF's ``causal_conv1d_fn``."""
        k = conv.kernel_size[0]
        attrs = StationaryAttrs(
            rank=1, stride=(1,), padding=((k - 1, 0),), dilation=(1,), output_padding=(0,), groups=conv.groups
        )
        roles = {"x": x, "weight": self.ctx.weight(f"{prefix}.weight")}
        if conv.bias is not None:
            roles["bias"] = self.ctx.weight(f"{prefix}.bias")
        return self.ctx.transform(attrs, roles, [x.type])[0]


def _activation(ctx: ConverterContext, name: str) -> str:
    op = ACTIVATIONS.get(str(name))
    if op is None:
        raise ItnetError(
            f"the mixer's activation {name!r} has no converter rule; use one of {sorted(ACTIVATIONS)}", layer=ctx.layer
        )
    return op


def _no_cache(ctx: ConverterContext, args: dict[str, object]) -> None:
    for key in ("cache", "cache_params", "inference_params"):
        if args.get(key) is not None:
            raise ItnetError(
                f"the mixer is called with a {key}; convert the model with use_cache=False (itnet captures whole "
                "sequences, not decoding steps)",
                layer=ctx.layer,
            )


# ---------------------------------------------------------------------------------------------------- LSTM / GRU


def _rnn_shapes(module: nn.RNNBase, input: object, hx: object = None) -> object:
    """What nn.LSTM / nn.GRU / nn.RNN return, as empty tensors."""
    name = type(module).__name__
    if isinstance(input, PackedSequence):
        raise ItnetError(
            f"{name} is called with a PackedSequence, which itnet does not convert; pass the padded batch "
            "(and its lengths to your own masking) instead"
        )
    unbatched = input.dim() == 2
    length = input.shape[0] if (unbatched or not module.batch_first) else input.shape[1]
    batch = () if unbatched else (input.shape[1] if not module.batch_first else input.shape[0],)
    dirs = 2 if module.bidirectional else 1
    proj = getattr(module, "proj_size", 0)
    out_shape = (length, *batch) if not module.batch_first or unbatched else (*batch, length)
    out = input.new_empty(*out_shape, dirs * (proj or module.hidden_size))
    h = input.new_empty(module.num_layers * dirs, *batch, proj or module.hidden_size)
    if isinstance(module, nn.LSTM):
        return out, (h, input.new_empty(module.num_layers * dirs, *batch, module.hidden_size))
    return out, h


def _convert_rnn(ctx: ConverterContext, module: nn.RNNBase, *inputs: Value) -> list[Value]:
    if module.mode.lower() not in CELLS:
        raise ItnetError(
            f"only the {', '.join(c.upper() for c in CELLS)} modes convert, not {module.mode}", layer=ctx.layer
        )
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise ItnetError(
            "the RNN is in training mode with dropout between layers; call model.eval() before converting",
            layer=ctx.layer,
        )
    args = bind_inputs(ctx, module, inputs)
    cell = module.mode.lower()
    roles: dict[str, object] = {"x": args["input"], "weights": [ctx.weight(n) for n in module._flat_weights_names]}
    hx = args.get("hx")
    if hx is not None:
        roles.update(zip(("h0", "c0"), hx, strict=True) if cell == "lstm" else {"h0": hx})
    attrs = GatedAttrs(
        cell=cell,
        input_size=module.input_size,
        hidden_size=module.hidden_size,
        proj_size=getattr(module, "proj_size", 0),
        num_layers=module.num_layers,
        bidirectional=module.bidirectional,
        batch_first=module.batch_first,
        bias=module.bias,
        support="full" if module.bidirectional else "causal",
    )
    return ctx.transform(attrs, roles, ctx.output_types)


_register(nn.LSTM, _rnn_shapes)(_convert_rnn)
_register(nn.GRU, _rnn_shapes)(_convert_rnn)
_register(nn.RNN, _rnn_shapes)(_convert_rnn)


# ----------------------------------------------------------------------------------------------------- Mamba


def _mixer_shapes(module: nn.Module, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """A Mamba mixer maps [B, L, hidden] to [B, L, hidden] in the input's dtype."""
    return hidden_states.new_empty(hidden_states.shape)


# The chunk of the chunked lowering for Mamba's diagonal A: its decay matrices carry the state axis, so the dense work
# per step grows with chunk · N (scan's with N); a short chunk keeps that overhead small.
MAMBA_CHUNK = 4


def _convert_mamba(ctx: ConverterContext, mixer: nn.Module, *inputs: Value) -> Value:
    """HF ``MambaMixer`` (the slow path of ``modeling_mamba``), step by step."""
    args = bind_inputs(ctx, mixer, inputs)
    _no_cache(ctx, args)
    e = _Emit(ctx)
    mask = args.get("attention_mask")
    hs = e.mask_padding(args["hidden_states"], mask)
    dtype = hs.type.dtype
    d, n, rank = mixer.intermediate_size, mixer.ssm_state_size, mixer.time_step_rank
    proj = e.linear(hs, ctx.weight("in_proj.weight"), e.weight(mixer, "in_proj.bias"))
    x, gate = e.split(proj, [d, d])
    conv = e.causal_depthwise_conv(e.transpose(x, 1, 2), mixer.conv1d, "conv1d")
    x = e.mask_padding(e.transpose(e.unary(_activation(ctx, mixer.activation), conv), 1, 2), mask)
    parts = e.split(e.linear(x, ctx.weight("x_proj.weight")), [rank, n, n])
    norms = mamba_norms(mixer) or {}  # FalconMamba's / Jamba's norms on dt, B and C, found by structure
    time_step, b, c = (
        _rms_norm(e, name, norms[name], v) if name in norms else v for name, v in zip(MAMBA_NORMS, parts, strict=True)
    )
    dt = e.linear(time_step, ctx.weight("dt_proj.weight"))
    a = e.unary("aten.neg.default", e.unary("aten.exp.default", e.cast(ctx.weight("A_log"), torch.float32)))
    attrs = SsmAttrs(heads=d, head_dim=1, groups=1, state_size=n, dt_softplus=True, chunk=MAMBA_CHUNK)
    roles = {
        "x": e.unsqueeze(x, -1),
        "dt": dt,
        "A": a,
        "B": e.unsqueeze(b, 2),
        "C": e.unsqueeze(c, 2),
        "D": e.cast(ctx.weight("D"), torch.float32),
    }
    bias = e.weight(mixer, "dt_proj.bias")
    if bias is not None:
        roles["dt_bias"] = e.cast(bias, torch.float32)
    (y,) = ctx.transform(attrs, roles, [TensorType(dtype, _dims(*x.type.shape, 1))])
    y = e.op("aten.squeeze.dim", [y, -1], dtype, x.type.shape)
    y = e.binary("aten.mul.Tensor", y, e.unary("aten.silu.default", gate))
    return e.linear(e.cast(y, dtype), ctx.weight("out_proj.weight"), e.weight(mixer, "out_proj.bias"))


def _convert_mamba2(ctx: ConverterContext, mixer: nn.Module, *inputs: Value) -> Value:
    """HF ``Mamba2Mixer`` (the torch path of ``modeling_mamba2``), step by step."""
    args = bind_inputs(ctx, mixer, inputs)
    _no_cache(ctx, args)
    e = _Emit(ctx)
    mask = args.get("attention_mask")
    hs = e.mask_padding(args["hidden_states"], mask)
    dtype = hs.type.dtype
    inner, heads, groups, n = mixer.intermediate_size, mixer.num_heads, mixer.n_groups, mixer.ssm_state_size
    conv_dim = inner + 2 * groups * n
    proj = e.linear(hs, ctx.weight("in_proj.weight"), e.weight(mixer, "in_proj.bias"))
    gate, xbc, dt = e.split(proj, [inner, conv_dim, heads])
    conv = e.causal_depthwise_conv(e.transpose(xbc, 1, 2), mixer.conv1d, "conv1d")
    xbc = e.mask_padding(e.transpose(e.unary(_activation(ctx, mixer.activation), conv), 1, 2), mask)
    x, b, c = e.split(xbc, [inner, groups * n, groups * n])
    a = e.unary("aten.neg.default", e.unary("aten.exp.default", e.cast(ctx.weight("A_log"), torch.float32)))
    lo, hi = (float(v) for v in getattr(mixer, "time_step_limit", (0.0, math.inf)))
    attrs = SsmAttrs(
        heads=heads,
        head_dim=mixer.head_dim,
        groups=groups,
        state_size=n,
        dt_softplus=True,
        dt_min=lo,
        dt_max=hi,
        chunk=int(mixer.chunk_size),
    )
    roles = {
        "x": e.unflatten(x, [heads, mixer.head_dim]),
        "dt": dt,
        "A": a,
        "B": e.unflatten(b, [groups, n]),
        "C": e.unflatten(c, [groups, n]),
        "D": ctx.weight("D"),
        "dt_bias": ctx.weight("dt_bias"),
    }
    (y,) = ctx.transform(attrs, roles, [roles["x"].type])
    y = _gated_rms_norm(e, mixer.norm, e.flatten_last(y, 2), gate)
    return e.linear(e.cast(y, dtype), ctx.weight("out_proj.weight"), e.weight(mixer, "out_proj.bias"))


def _rms_norm(e: _Emit, name: str, norm: RmsNorm, x: Value) -> Value:
    """HF's RMS norms (``JambaRMSNorm``, ``FalconMambaWeightlessRMSNorm``): in float32, back to x's dtype, then
    times the weight when the norm has one."""
    h = e.cast(x, torch.float32)
    var = e.op("aten.mean.dim", [e.unary("aten.pow.Tensor_Scalar", h, 2), [-1], True], h.type.dtype,
               (*h.type.shape[:-1], 1))  # fmt: skip
    inv = e.unary("aten.rsqrt.default", e.binary("aten.add.Tensor", var, norm.eps))
    h = e.cast(e.binary("aten.mul.Tensor", h, inv), x.type.dtype)
    return e.binary("aten.mul.Tensor", e.ctx.weight(f"{name}.weight"), h) if norm.weighted else h


def _gated_rms_norm(e: _Emit, norm: nn.Module, y: Value, gate: Value) -> Value:
    """HF ``MambaRMSNormGated``: RMS-normalise y·silu(gate) per group of ``group_size`` channels, in float32."""
    dtype = y.type.dtype
    size = int(y.type.shape[-1])
    group = int(getattr(norm, "group_size", size))
    h = e.binary("aten.mul.Tensor", e.cast(y, torch.float32), e.unary("aten.silu.default", e.cast(gate, torch.float32)))
    h = e.unflatten(h, [size // group, group])
    var = e.op("aten.mean.dim", [e.unary("aten.pow.Tensor_Scalar", h, 2), [-1], True], h.type.dtype,
               (*h.type.shape[:-1], 1))  # fmt: skip
    inv = e.unary("aten.rsqrt.default", e.binary("aten.add.Tensor", var, float(norm.variance_epsilon)))
    h = e.flatten_last(e.binary("aten.mul.Tensor", h, inv), 2)
    return e.binary("aten.mul.Tensor", e.ctx.weight("norm.weight"), e.cast(h, dtype))


# By qualified name: importing transformers' Mamba modules takes seconds, and itnet does not need transformers at all.
_register("transformers.models.mamba.modeling_mamba.MambaMixer", _mixer_shapes)(_convert_mamba)
_register("transformers.models.mamba2.modeling_mamba2.Mamba2Mixer", _mixer_shapes)(_convert_mamba2)
# Any other class of the same structure (FalconMamba's and Jamba's mixers, a user's copy): ``mamba_structure``.
register_structural_converter("mamba-mixer", is_mamba_mixer, _convert_mamba, shapes=_mixer_shapes)
register_structural_converter("mamba2-mixer", is_mamba2_mixer, _convert_mamba2, shapes=_mixer_shapes)
