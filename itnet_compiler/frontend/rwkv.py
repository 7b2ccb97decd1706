"""RWKV's self-attention (transformers' ``RwkvSelfAttention``, and any module of its structure) as one ``wkv`` node.

Why a converter: transformers' CPU path of the WKV is a Python loop over time, so torch.export unrolls it, specialised
to one length. The converter writes the layer's math instead: the time shift (``ZeroPad2d((0, 0, 1, -1))``, one step
back with zeros in front), the three token mixes, the key / value / receptance projections, the sigmoid of the
receptance and the output projection as generic ATen ops, and the recurrence as a ``wkv`` node with w = exp(time_decay)
and u = time_first (``ir/wkv.py``). A ``shapes`` function stands in for the forward on fake tensors, so the length
stays symbolic.

Only whole sequences convert: a call with a ``state`` or ``use_cache=True`` (decoding) is refused with one line; the
module then returns exactly what transformers returns without a cache, ``(output, None)``.

A module is taken by structure when it holds exactly the parameters time_decay [C], time_first [C] and
time_mix_key / time_mix_value / time_mix_receptance [1, 1, H], the children key, value, receptance (H → C, no bias),
output (C → H, no bias) and time_shift (a ZeroPad2d of (0, 0, 1, -1)), and its forward takes (hidden, state,
use_cache). Anything else is traced as usual.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import ItnetError
from ..ir.core import Value
from ..ir.wkv import WkvAttrs
from .builtin_converters import _Emit, _register, bind_inputs
from .converters import ConverterContext, register_structural_converter

_MIXES = ("key", "value", "receptance")
_PARAMS = frozenset({"time_decay", "time_first", *(f"time_mix_{n}" for n in _MIXES)})
_CHILDREN = frozenset({"key", "value", "receptance", "output", "time_shift"})
_SHIFT = (0, 0, 1, -1)


def _linear(m: object, n_in: int, n_out: int) -> bool:
    return isinstance(m, nn.Linear) and (m.in_features, m.out_features) == (n_in, n_out) and m.bias is None


def is_rwkv_attention(m: nn.Module) -> bool:
    """A module that the RWKV converter computes exactly (see the module docstring for what is checked)."""
    own = {n for n, _ in m.named_parameters(recurse=False)} | {n for n, _ in m.named_buffers(recurse=False)}
    if own != _PARAMS or {n for n, _ in m.named_children()} != _CHILDREN:
        return False
    decay, first = m.time_decay, m.time_first
    if decay.dim() != 1 or first.shape != decay.shape:
        return False
    c, hidden = decay.shape[0], m.key.in_features if isinstance(m.key, nn.Linear) else -1
    if any(getattr(m, f"time_mix_{n}").shape != (1, 1, hidden) for n in _MIXES):
        return False
    if not (all(_linear(getattr(m, n), hidden, c) for n in _MIXES) and _linear(m.output, c, hidden)):
        return False
    shift = m.time_shift
    if not (isinstance(shift, nn.ZeroPad2d) and tuple(shift.padding) == _SHIFT and float(shift.value) == 0.0):
        return False
    try:
        params = list(inspect.signature(type(m).forward).parameters)[1:]
    except (TypeError, ValueError):
        return False
    return params == ["hidden", "state", "use_cache"]


def _refuse_cache(state: object, use_cache: object, layer: str | None = None) -> None:
    if state is not None or use_cache:
        raise ItnetError(
            "the RWKV attention is called with a state or use_cache=True; convert the model with use_cache=False "
            "(itnet captures whole sequences, not decoding steps)",
            layer=layer,
        )


def _shapes(module: nn.Module, hidden: torch.Tensor, state: object = None, use_cache: object = False) -> object:
    """What the forward returns without a cache: ([B, L, hidden] in the input's dtype, None)."""
    _refuse_cache(state, use_cache)
    return hidden.new_empty(*hidden.shape[:-1], module.output.out_features), None


def _convert(ctx: ConverterContext, module: nn.Module, *inputs: Value) -> list[Value]:
    """transformers' ``RwkvSelfAttention.forward`` with state=None, use_cache=False, step by step."""
    args = bind_inputs(ctx, module, inputs)
    _refuse_cache(args.get("state"), args.get("use_cache"), ctx.layer)
    e = _Emit(ctx)
    hidden = args["hidden"]
    dtype = hidden.type.dtype
    shifted = e.op("aten.constant_pad_nd.default", [hidden, list(_SHIFT), 0.0], dtype, hidden.type.shape)

    def mixed(name: str) -> Value:
        mix = ctx.weight(f"time_mix_{name}")
        rest = e.op("aten.rsub.Scalar", [mix, 1], mix.type.dtype, mix.type.shape)
        ours = e.binary("aten.mul.Tensor", hidden, mix)
        return e.binary("aten.add.Tensor", ours, e.binary("aten.mul.Tensor", shifted, rest))

    key, value, receptance = (e.linear(mixed(n), ctx.weight(f"{n}.weight")) for n in _MIXES)
    receptance = e.unary("aten.sigmoid.default", receptance)
    roles = {
        "k": key,
        "v": value,
        "w": e.unary("aten.exp.default", ctx.weight("time_decay")),
        "u": ctx.weight("time_first"),
    }
    (rwkv,) = ctx.transform(WkvAttrs(channels=int(module.time_decay.shape[0])), roles, [key.type])
    return [e.linear(e.binary("aten.mul.Tensor", receptance, rwkv), ctx.weight("output.weight"))]


# By qualified name (transformers is never imported by itnet), and by structure for copies under other names.
_register("transformers.models.rwkv.modeling_rwkv.RwkvSelfAttention", _shapes)(_convert)
register_structural_converter("rwkv-attention", is_rwkv_attention, _convert, shapes=_shapes)
