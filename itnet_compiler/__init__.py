"""itnet: convolution, attention and recurrence as one integral transform, compiled.

import itnet_compiler as itc
prog = itc.convert(model, args)
mod = itc.build(prog, backend="torch", plan={"encoder.*": "fused"})
"""

from .api import build, calibrate, convert, load, lowerings, parse, plan_program, targets, tune
from .errors import ItnetError, ParseError
from .export.api import export_mlir, export_onnx, export_triton
from .frontend import builtin_converters as _builtin_converters  # noqa: F401  (registers nn.LSTM, nn.GRU, Mamba)
from .frontend import rwkv as _rwkv_converter  # noqa: F401  (registers RWKV's self-attention)
from .frontend.converters import ConverterContext, register_converter, unregister_converter
from .ir import FAMILIES, Lowering, LoweringSpec, Node, Program, Target, Value, register_lowering
from .ir.fields import Options, option
from .ir.lowering import unregister_lowering

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "ConverterContext",
    "ItnetError",
    "Lowering",
    "LoweringSpec",
    "Node",
    "Options",
    "ParseError",
    "Program",
    "Target",
    "Value",
    "build",
    "calibrate",
    "convert",
    "export_mlir",
    "export_onnx",
    "export_triton",
    "load",
    "lowerings",
    "option",
    "parse",
    "plan_program",
    "register_converter",
    "register_lowering",
    "targets",
    "tune",
    "unregister_converter",
    "unregister_lowering",
]
