"""The ONNX body of an exact ``dot_exp`` transform: ``Attention`` at opset 23 and later, MatMul / Softmax / MatMul below
(and whenever the weights are returned). Inputs q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], an optional
bool (True = attend) or additive mask; causal supports are top-left aligned, ``window(r)`` keeps i - r < j <= i."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ir.core import Node
from ..ir.types import TensorType

_ONNX_DTYPE = {
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
}


class Nodes:
    """A list of NodeProtos with fresh value names."""

    def __init__(self, prefix: str = "t"):
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0
        self._prefix = prefix

    def fresh(self) -> str:
        self._n += 1
        return f"{self._prefix}{self._n}"

    def op(self, op_type: str, inputs: list[str], out: str | None = None, n_out: int = 1, **attrs) -> str:
        outs = [out or self.fresh()] + [self.fresh() for _ in range(n_out - 1)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, array: np.ndarray) -> str:
        name = self.fresh()
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name)))
        return name

    def scalar(self, value: float, onnx_dtype: int) -> str:
        """A 0-d constant of ``onnx_dtype`` (a float cast from float32, so half types work)."""
        c = self.const(np.array(value, dtype=np.float32))
        return c if onnx_dtype == TensorProto.FLOAT else self.op("Cast", [c], to=onnx_dtype)

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def dim(self, x: str, axis: int) -> str:
        """Size of ``x`` along ``axis`` (>= 0) as a 1-element int64 tensor."""
        return self.op("Shape", [x], start=axis, end=axis + 1)


def _dtype(t: TensorType) -> int:
    return _ONNX_DTYPE.get(str(t.dtype).removeprefix("torch."), TensorProto.FLOAT)


def support_keep(b: Nodes, q: str, k: str, causal: bool, window: int) -> str | None:
    """Bool [Lq, Lk]: True where the support admits (i, j)."""
    if not causal:
        return None
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    lq = b.op("Squeeze", [b.dim(q, 2)])
    lk = b.op("Squeeze", [b.dim(k, 2)])
    i = b.op("Unsqueeze", [b.op("Range", [zero, lq, one]), b.ints(1)])
    j = b.op("Unsqueeze", [b.op("Range", [zero, lk, one]), b.ints(0)])
    keep = b.op("LessOrEqual", [j, i])
    if window:
        low = b.op("Sub", [i, b.const(np.array(window, np.int64))])
        keep = b.op("And", [keep, b.op("Greater", [j, low])])
    return keep


def _expand_heads(b: Nodes, x: str, groups: int, heads: int, last: int) -> str:
    """[B, Hkv, L, D] -> [B, Hkv·groups, L, D], each key/value head repeated for its group of query heads."""
    if groups == 1:
        return x
    x5 = b.op("Unsqueeze", [x, b.ints(2)])
    s = b.op("Shape", [x])
    shape = b.op("Concat", [b.op("Slice", [s, b.ints(0), b.ints(2)]), b.ints(groups), b.op("Slice", [s, b.ints(2), b.ints(4)])], axis=0)
    x5 = b.op("Expand", [x5, shape])
    return b.op("Reshape", [x5, b.ints(0, heads, -1, last)])


def emit(node: Node, ins: list[str], outs: list[str], opset: int) -> list[onnx.NodeProto]:
    a = node.attrs
    q, k, v = ins[:3]
    mask = ins[3] if a.mask != "none" else None
    qt, vt = node.kwargs["q"].type, node.kwargs["v"].type
    dt = _dtype(qt)
    b = Nodes()
    keep = support_keep(b, q, k, a.causal, a.window)
    if opset >= 23 and not a.return_weights:
        attn_mask, causal = mask, 0
        if keep is not None and mask is None and not a.window:
            causal = 1
        elif keep is not None:
            attn_mask = _combine(b, mask, keep, a.mask, dt)
        attrs = {"scale": float(a.scale), "is_causal": causal}
        b.op("Attention", [q, k, v] + ([attn_mask] if attn_mask is not None else []), out=outs[0], **attrs)
        return b.nodes
    groups = a.heads // a.kv_heads
    k = _expand_heads(b, k, groups, a.heads, int(qt.shape[3]))
    v = _expand_heads(b, v, groups, a.heads, int(vt.shape[3]))
    s = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]), b.scalar(a.scale, dt)])
    ninf = b.scalar(float("-inf"), dt)
    if mask is not None and a.mask == "bool":
        s = b.op("Where", [mask, s, ninf])
    elif mask is not None:
        s = b.op("Add", [s, mask])
    if keep is not None:
        s = b.op("Where", [keep, s, ninf])
    p = b.op("Softmax", [s], axis=-1)
    b.op("MatMul", [p, v], out=outs[0])
    if a.return_weights:
        b.op("Identity", [p], out=outs[1])
    return b.nodes


def _combine(b: Nodes, mask: str | None, keep: str, kind: str, dt: int) -> str:
    """The user's mask and the support's as one ``Attention`` mask (bool when the user's is bool or absent)."""
    if mask is None or kind == "bool":
        return keep if mask is None else b.op("And", [mask, keep])
    return b.op("Where", [keep, mask, b.scalar(float("-inf"), dt)])
