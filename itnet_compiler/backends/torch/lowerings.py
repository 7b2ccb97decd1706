"""All torch lowerings, importable from one place: importing this module registers every implementation."""

from .attention import attention_dense, attention_fused, attention_library
from .conv import conv_dense, conv_library
from .registry import LOWERINGS, OPTIONS, implementation, register

__all__ = [
    "LOWERINGS",
    "OPTIONS",
    "attention_dense",
    "attention_fused",
    "attention_library",
    "conv_dense",
    "conv_library",
    "implementation",
    "register",
]
