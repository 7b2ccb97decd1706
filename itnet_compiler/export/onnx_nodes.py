"""A small NodeProto builder shared by the hand-written ONNX bodies (fresh names, constants, shape slices)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ir.types import TensorType

_ONNX_DTYPE = {
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "bool": TensorProto.BOOL,
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


def onnx_dtype(t: TensorType) -> int:
    return _ONNX_DTYPE.get(str(t.dtype).removeprefix("torch."), TensorProto.FLOAT)
