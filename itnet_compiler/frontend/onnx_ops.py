"""The ONNX → torch op table of the importer: one small function per op type, written for opset 18 semantics and
reading the older forms (axes, splits, pads as attributes) too.

Shapes, axes and small integer constants flow as ``Static`` values (numpy arrays whose entries may be torch SymInts)
so that ``Shape → Gather → Concat → Reshape`` chains stay symbolic under ``torch.export`` instead of becoming tensors
of traced data; they become tensors only where a tensor op reads them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from ..errors import ItnetError


class Static:
    """A value known while tracing: shape entries (possibly symbolic) or a small integer constant."""

    def __init__(self, arr: object):
        self.arr = np.asarray(arr) if not isinstance(arr, np.ndarray) else arr

    def ints(self) -> list:
        return [_int(v) for v in self.arr.reshape(-1).tolist()]


def _int(v: object) -> object:
    return v if isinstance(v, torch.SymInt) else int(v)


def as_tensor(x: object, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor) or x is None:
        return x
    arr = x.arr
    if arr.dtype == object:
        flat = [torch.as_tensor(v) if not isinstance(v, torch.SymInt) else torch.scalar_tensor(v, dtype=torch.int64)
                for v in arr.reshape(-1).tolist()]  # fmt: skip
        t = (
            torch.stack([f.to(torch.int64) for f in flat]).reshape(arr.shape)
            if flat
            else torch.zeros(0, dtype=torch.int64)
        )
    else:
        t = torch.from_numpy(np.array(arr, copy=True))
    return t.to(like.device) if like is not None else t


def ints(x: object) -> list:
    """Shape-like input as a Python list (entries int or SymInt)."""
    if isinstance(x, Static):
        return x.ints()
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    return list(x)


class OnnxNode:
    def __init__(self, proto: onnx.NodeProto, opset: int, index: int):
        self.proto = proto
        self.op_type = proto.op_type
        self.name = proto.name or f"{proto.op_type}_{index}"
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.opset = opset
        self.module: str | None = None
        self.attrs = {a.name: helper.get_attribute_value(a) for a in proto.attribute}

    def attr(self, name: str, default: object = None) -> object:
        v = self.attrs.get(name, default)
        return v.decode() if isinstance(v, bytes) else v

    def constant(self) -> np.ndarray:
        a = self.proto.attribute[0]
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        v = helper.get_attribute_value(a)
        kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
        if a.name not in kinds:
            raise ItnetError(f"node '{self.name}': Constant with {a.name} is not imported")
        return np.array(v, dtype=kinds[a.name])


Op = Callable[..., object]
# Ops whose handlers compute on Static values (shape arithmetic); every other op receives tensors.
STATIC_AWARE = frozenset(
    "Add Sub Mul Div Mod Equal Less LessOrEqual Greater GreaterOrEqual And Or Xor Pow Neg Abs Not Sign Where Cast "
    "CastLike Identity Sqrt Reciprocal Shape Size Reshape Squeeze Unsqueeze Concat Slice Gather Expand Tile "
    "ConstantOfShape Range "
    "Split Pad TopK Trilu CumSum Clip ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL2 ReduceL1 "
    "ReduceSumSquare ReduceLogSumExp".split()
)
OPS: dict[str, Op] = {}


def op(*names: str) -> Callable[[Op], Op]:
    def deco(fn: Op) -> Op:
        for n in names:
            OPS[n] = fn
        return fn

    return deco


OPS["Constant"] = lambda n: None  # bound at load time


def _t(x: object, like: object = None) -> torch.Tensor:
    ref = like if isinstance(like, torch.Tensor) else None
    t = as_tensor(x, ref)
    if ref is not None and t.dtype != ref.dtype and not (t.dtype == torch.bool or ref.dtype == torch.bool):
        if t.is_floating_point() or not ref.is_floating_point():
            return t.to(ref.dtype) if t.dim() == 0 or not t.is_floating_point() else t
        return t.to(ref.dtype)
    return t


def _static_binary(fn_np: Callable, fn_t: Callable) -> Op:
    def run(n: OnnxNode, a: object, b: object) -> object:
        if isinstance(a, Static) and isinstance(b, Static):
            return Static(fn_np(a.arr, b.arr))
        ta = a if isinstance(a, torch.Tensor) else None
        tb = b if isinstance(b, torch.Tensor) else None
        x = _t(a, tb) if ta is None else ta
        y = _t(b, ta) if tb is None else tb
        return fn_t(x, y)

    return run


OPS["Add"] = _static_binary(lambda a, b: a + b, torch.add)
OPS["Sub"] = _static_binary(lambda a, b: a - b, torch.sub)
OPS["Mul"] = _static_binary(lambda a, b: a * b, torch.mul)
OPS["Equal"] = _static_binary(lambda a, b: a == b, torch.eq)
OPS["Less"] = _static_binary(lambda a, b: a < b, torch.lt)
OPS["LessOrEqual"] = _static_binary(lambda a, b: a <= b, torch.le)
OPS["Greater"] = _static_binary(lambda a, b: a > b, torch.gt)
OPS["GreaterOrEqual"] = _static_binary(lambda a, b: a >= b, torch.ge)
OPS["And"] = _static_binary(lambda a, b: a & b, torch.logical_and)
OPS["Or"] = _static_binary(lambda a, b: a | b, torch.logical_or)
OPS["Xor"] = _static_binary(lambda a, b: a ^ b, torch.logical_xor)
OPS["Pow"] = _static_binary(lambda a, b: a**b, lambda a, b: torch.pow(a, b).to(a.dtype))


@op("Div")
def _div(n, a, b):
    if isinstance(a, Static) and isinstance(b, Static):
        return Static(a.arr // b.arr if a.arr.dtype.kind in "iuO" else a.arr / b.arr)  # sizes: floor = trunc
    x = a if isinstance(a, torch.Tensor) else _t(a, b)
    y = b if isinstance(b, torch.Tensor) else _t(b, x)
    if not x.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


@op("Mod")
def _mod(n, a, b):
    if isinstance(a, Static) and isinstance(b, Static):
        return Static(np.fmod(a.arr, b.arr) if n.attr("fmod", 0) else a.arr % b.arr)
    a, b = _t(a, b), _t(b, a)
    return torch.fmod(a, b) if n.attr("fmod", 0) else torch.remainder(a, b)


_UNARY = {
    "Neg": torch.neg, "Abs": torch.abs, "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Sin": torch.sin, "Cos": torch.cos,
    "Tan": torch.tan, "Tanh": torch.tanh, "Sigmoid": torch.sigmoid, "Relu": torch.relu, "Erf": torch.erf,
    "Not": torch.logical_not, "Sign": torch.sign, "Round": torch.round, "IsNaN": torch.isnan,
    "Softsign": F.softsign, "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh,
    "Cosh": torch.cosh, "Mish": F.mish,
}  # fmt: skip
_STATIC_UNARY = {
    "Neg": np.negative,
    "Abs": np.abs,
    "Not": np.logical_not,
    "Sign": np.sign,
    "Sqrt": np.sqrt,
    "Reciprocal": np.reciprocal,
}


def _unary(name: str, fn: Callable) -> Op:
    def run(n: OnnxNode, x: object) -> object:
        if isinstance(x, Static) and name in _STATIC_UNARY:
            return Static(_STATIC_UNARY[name](x.arr))
        return fn(_t(x))

    return run


for _name, _fn in _UNARY.items():
    OPS[_name] = _unary(_name, _fn)


@op("Identity")
def _identity(n, x):
    return x


@op("Dropout")
def _dropout(n, x, *rest):
    return x, torch.ones_like(x, dtype=torch.bool)


@op("LeakyRelu")
def _leaky(n, x):
    return F.leaky_relu(x, n.attr("alpha", 0.01))


@op("Elu")
def _elu(n, x):
    return F.elu(x, n.attr("alpha", 1.0))


@op("Selu")
def _selu(n, x):
    a, g = n.attr("alpha", 1.67326319217681884765625), n.attr("gamma", 1.05070102214813232421875)
    return g * torch.where(x > 0, x, a * (torch.exp(x) - 1))


@op("Celu")
def _celu(n, x):
    return F.celu(x, n.attr("alpha", 1.0))


@op("Gelu")
def _gelu(n, x):
    return F.gelu(x, approximate=n.attr("approximate", "none"))


@op("Softplus")
def _softplus(n, x):
    return F.softplus(x)


@op("HardSigmoid")
def _hardsigmoid(n, x):
    return torch.clamp(n.attr("alpha", 0.2) * x + n.attr("beta", 0.5), 0, 1)


@op("HardSwish")
def _hardswish(n, x):
    return F.hardswish(x)


@op("PRelu")
def _prelu(n, x, slope):
    return torch.where(x >= 0, x, x * slope)


@op("ThresholdedRelu")
def _thr(n, x):
    return torch.where(x > n.attr("alpha", 1.0), x, torch.zeros_like(x))


@op("IsInf")
def _isinf(n, x):
    pos, neg = n.attr("detect_positive", 1), n.attr("detect_negative", 1)
    return (torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))


@op("Clip")
def _clip(n, x, lo=None, hi=None):
    lo = n.attr("min") if lo is None else lo
    hi = n.attr("max") if hi is None else hi
    lo = _t(lo, x) if lo is not None and not isinstance(lo, float) else lo
    hi = _t(hi, x) if hi is not None and not isinstance(hi, float) else hi
    return torch.clamp(x, lo, hi)


def _variadic(fn):
    def run(n, *xs):
        ts = [_t(x) for x in xs if x is not None]
        out = ts[0]
        for t in ts[1:]:
            out = fn(out, t)
        return out

    return run


OPS["Max"] = _variadic(torch.maximum)
OPS["Min"] = _variadic(torch.minimum)
OPS["Sum"] = _variadic(torch.add)


@op("Mean")
def _mean(n, *xs):
    return OPS["Sum"](n, *xs) / len(xs)


@op("Where")
def _where(n, c, a, b):
    if all(isinstance(v, Static) for v in (c, a, b)):
        return Static(np.where(c.arr, a.arr, b.arr))
    ref = a if isinstance(a, torch.Tensor) else b if isinstance(b, torch.Tensor) else None
    return torch.where(_t(c).bool(), _t(a, ref), _t(b, ref))


@op("Cast", "CastLike")
def _cast(n, x, like=None):
    dtype = like.dtype if like is not None else _onnx_dtype(n.attr("to"))
    if isinstance(x, Static) and not dtype.is_floating_point:
        return Static(x.arr.astype(object if x.arr.dtype == object else _NP[dtype]))
    concrete = isinstance(x, Static) and all(not isinstance(v, torch.SymInt) for v in x.arr.reshape(-1).tolist())
    if concrete and dtype in (torch.float32, torch.float64, torch.float16):
        return Static(
            x.arr.astype({torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}[dtype])
        )  # a scale from sizes
    return _t(x).to(dtype)


def _onnx_dtype(code: int) -> torch.dtype:
    from .onnx_import import torch_dtype

    return torch_dtype(code, "a Cast")


_NP = {torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_, torch.int8: np.int8, torch.uint8: np.uint8}
