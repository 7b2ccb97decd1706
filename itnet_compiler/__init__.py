"""itnet: convolution, attention and recurrence as one integral transform, compiled.

import itnet_compiler as itc
prog = itc.convert(model, args)
mod = itc.build(prog, backend="torch", plan={"encoder.*": "fused"})
"""

from .api import build, convert, load, parse, plan_program
from .errors import ItnetError, ParseError
from .frontend import builtin_converters as _builtin_converters  # noqa: F401  (registers nn.LSTM, nn.GRU, Mamba)
from .frontend.converters import ConverterContext, register_converter, unregister_converter
from .ir import FAMILIES, Node, Program, Value

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "ConverterContext",
    "ItnetError",
    "Node",
    "ParseError",
    "Program",
    "Value",
    "build",
    "convert",
    "load",
    "parse",
    "plan_program",
    "register_converter",
    "unregister_converter",
]
