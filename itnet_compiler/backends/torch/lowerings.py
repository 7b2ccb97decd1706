"""All torch lowerings, importable from one place: importing this module registers every implementation."""

from .attention import attention_dense, attention_fused, attention_library
from .conv import conv_dense, conv_library
from .fft import conv_fft_1d
from .fft_conv import conv_fft
from .fused_conv import conv_fused
from .hybrid import attention_hybrid
from .lowrank import attention_lowrank
from .lowrank_conv import conv_lowrank
from .mlp import mlp_dense, mlp_fused, mlp_montecarlo
from .mlp_lowrank import mlp_lowrank
from .montecarlo import attention_montecarlo
from .montecarlo_conv import conv_montecarlo
from .recurrent import gated_library, gated_scan, ssm_chunked, ssm_dense, ssm_scan
from .registry import LOWERINGS, implementation, register
from .wkv import wkv_chunked, wkv_scan

__all__ = [
    "LOWERINGS",
    "attention_dense",
    "attention_fused",
    "attention_hybrid",
    "attention_library",
    "attention_lowrank",
    "attention_montecarlo",
    "conv_dense",
    "conv_fft",
    "conv_fft_1d",
    "conv_fused",
    "conv_library",
    "conv_lowrank",
    "conv_montecarlo",
    "gated_library",
    "gated_scan",
    "implementation",
    "mlp_dense",
    "mlp_fused",
    "mlp_lowrank",
    "mlp_montecarlo",
    "register",
    "ssm_chunked",
    "ssm_dense",
    "ssm_scan",
    "wkv_chunked",
    "wkv_scan",
]
