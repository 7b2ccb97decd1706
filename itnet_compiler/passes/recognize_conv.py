"""Recognise every ATen convolution as an ``it.transform`` of the ``stationary`` family.

Expects: generic ATen nodes from the frontend. Guarantees: valid IR; each conv{1,2,3}d (``.default`` and
``.padding`` for 'same'/'valid'), conv_transpose{1,2,3}d (``conv_transpose1d.default``, ``conv_transpose{2,3}d.input``),
``convolution``, ``_convolution`` and ``_convolution_mode`` node with a batched input becomes one ``it.transform``
with explicit (low, high) padding per dim. An ``aten.pad`` / ``constant_pad_nd`` (zeros, reflect, replicate,
circular) that only feeds an unpadded convolution is folded into it as ``padding_mode``. Unbatched inputs, symbolic
strides or groups, and transposed convolutions with asymmetric padding stay generic.
"""

from __future__ import annotations

from ..ir.core import TRANSFORM, Node, Value
from ..ir.families import StationaryAttrs
from ..ir.types import TensorType
from .rewrite import Match, Rewrite, Rule, bind

CONV_OPS = tuple(f"aten.conv{r}d.{o}" for r in (1, 2, 3) for o in ("default", "padding"))
# The 1-d overload is named ``default``, the 2-d and 3-d ones ``input``.
CONVT_OPS = ("aten.conv_transpose1d.default", "aten.conv_transpose2d.input", "aten.conv_transpose3d.input")
# Explicit ``transposed`` flag; the cudnn/benchmark flags of ``_convolution`` do not change the result.
GENERAL_OPS = (
    "aten.convolution.default",
    "aten._convolution.default",
    "aten._convolution.deprecated",
    "aten._convolution_mode.default",
)
_PAD_OPS = ("aten.pad.default", "aten.constant_pad_nd.default")


def _expand(val: object, rank: int) -> tuple[int, ...]:
    vals = list(val) if isinstance(val, (list, tuple)) else [val]
    if len(vals) == 1:
        vals = vals * rank
    if len(vals) != rank or not all(isinstance(v, int) for v in vals):
        raise ValueError(f"expected {rank} integers, got {val!r}")
    return tuple(vals)


def _padding(pad: object, rank: int, kernel: tuple, dilation: tuple) -> tuple[tuple[int, int], ...]:
    if pad == "valid":
        return ((0, 0),) * rank
    if pad == "same":
        out = []
        for k, d in zip(kernel, dilation, strict=True):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    return tuple((p, p) for p in _expand(pad, rank))


def _convert(m: Match) -> Rewrite | None:
    node = m.node
    try:
        a = bind(node)
    except (AssertionError, ValueError):
        return None
    x, w = a["input"], a["weight"]
    if not isinstance(x, Value) or not isinstance(w, Value):
        return None
    if not isinstance(x.type, TensorType) or not isinstance(w.type, TensorType):
        return None
    rank = w.type.rank - 2
    if x.type.rank != rank + 2 or rank not in (1, 2, 3):
        return None
    transposed = bool(a.get("transposed", node.op in CONVT_OPS))
    try:
        kernel = tuple(int(k) for k in w.type.shape[2:])
        stride = _expand(a["stride"], rank)
        dilation = _expand(a["dilation"], rank)
        padding = _padding(a["padding"], rank, kernel, dilation)
        out_pad = _expand(a.get("output_padding", 0), rank)
    except (TypeError, ValueError):
        return None
    groups = a.get("groups", 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        return None
    if transposed and any(lo != hi for lo, hi in padding):
        return None
    attrs = StationaryAttrs(
        rank=rank,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        transposed=transposed,
        output_padding=out_pad if transposed else (0,) * rank,
    )
    x, attrs = _fold_pad(m, x, attrs)
    inputs: dict[str, object] = {"x": x, "weight": w}
    if a.get("bias") is not None:
        inputs["bias"] = a["bias"]
    out = node.outputs[0]
    new = Node(TRANSFORM, [], inputs, [Value(out.name, out.type)], attrs, node.layer)
    return Rewrite([new], {out: new.outputs[0]})


def _fold_pad(m: Match, x: Value, attrs: StationaryAttrs) -> tuple[Value, StationaryAttrs]:
    """Fold ``aten.pad(x, pads, mode)`` into the convolution when the conv has no padding of its own."""
    pad = m.producer(x)
    if pad is None or pad.op not in _PAD_OPS or attrs.transposed:
        return x, attrs
    if any(p != (0, 0) for p in attrs.padding) or m.only_user(x) is not m.node:
        return x, attrs
    a = bind(pad)
    mode = a.get("mode", "constant")
    pads = a["pad"]
    if mode not in ("reflect", "replicate", "circular", "constant") or len(pads) != 2 * attrs.rank:
        return x, attrs
    if mode == "constant" and a.get("value") not in (None, 0, 0.0):
        return x, attrs
    if not all(isinstance(p, int) and p >= 0 for p in pads):
        return x, attrs
    # pads run from the last dim backwards: (lo_last, hi_last, lo_prev, hi_prev, ...)
    per_dim = tuple((pads[2 * i], pads[2 * i + 1]) for i in range(attrs.rank))[::-1]
    src = a["self"]
    assert isinstance(src, Value)
    return src, attrs.replace(padding=per_dim, padding_mode="zeros" if mode == "constant" else mode)


RULES: list[Rule] = [(CONV_OPS + CONVT_OPS + GENERAL_OPS, _convert)]
