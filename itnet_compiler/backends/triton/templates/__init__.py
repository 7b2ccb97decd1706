"""Triton kernel templates. Each opens with a comment block of its notation; holes are ``{{NAME}}``.

The vocabulary of holes is fixed:
- ``KERNEL``: the family's kernel expression. It reads ``q`` [BLOCK_M, BLOCK_D], ``kT`` [BLOCK_D, BLOCK_N],
  ``offs_m``, ``offs_n``, ``b``, ``h`` and the bias pointer/strides, and writes ``s`` [BLOCK_M, BLOCK_N]: the logit of
  K(i, j) in base-2 units (so that K = exp2(s)). Masking of out-of-range and causal pairs is the template's job.
Loads, the online normalisation, the epilogue and the stores are the template's.
"""

from .attention import ATTENTION, DOT_EXP_KERNEL
from .gated import GRU_KERNEL, GRU_SCAN, LSTM_KERNEL, LSTM_SCAN, RNN_SCAN
from .mlp import MLP_FUSED
from .mlp import holes as mlp_holes
from .ssd import SSD, SSD_KERNEL
from .ssm import SSM_KERNEL, SSM_SCAN
from .stationary import DEPTHWISE, IMPLICIT_GEMM, STATIONARY_DEPTHWISE_KERNEL, STATIONARY_GEMM_KERNEL
from .wkv import WKV_SCAN
from .wkv_chunked import WKV_CHUNKED

__all__ = [
    "ATTENTION",
    "DEPTHWISE",
    "DOT_EXP_KERNEL",
    "GRU_KERNEL",
    "GRU_SCAN",
    "IMPLICIT_GEMM",
    "LSTM_KERNEL",
    "LSTM_SCAN",
    "RNN_SCAN",
    "MLP_FUSED",
    "SSD",
    "SSD_KERNEL",
    "SSM_KERNEL",
    "SSM_SCAN",
    "STATIONARY_DEPTHWISE_KERNEL",
    "STATIONARY_GEMM_KERNEL",
    "WKV_CHUNKED",
    "WKV_SCAN",
    "mlp_holes",
]
