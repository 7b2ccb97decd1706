"""The builtin lowering records, one module per family: importing this package registers them all."""

from . import dot_exp, mlp, recurrent, stationary, wkv
from .options import ChunkedOptions, ConvLowRankOptions, LowRankOptions, MonteCarloOptions

__all__ = ["ChunkedOptions", "ConvLowRankOptions", "LowRankOptions", "MonteCarloOptions", "dot_exp", "mlp",
           "recurrent", "stationary", "wkv"]  # fmt: skip
