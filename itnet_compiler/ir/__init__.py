"""The integral-transform IR: types, program, families, printer, parser, verifier, bundles."""

from . import lowerings as _builtin_lowerings  # noqa: E402,F401  (registers the builtin lowering records)
from .core import TRANSFORM, Node, Program, Value, Weight
from .families import FAMILIES, DotExpAttrs, FamilyAttrs, StationaryAttrs, parse_lowering, register_family
from .lowering import REGISTRY, Lowering, LoweringSpec, lowering, lowerings, register_lowering  # noqa: E402
from .mlp import MlpAttrs
from .parser import parse
from .printer import print_program
from .recurrent import GatedAttrs, SsmAttrs
from .target import TARGETS, Target, get_target  # noqa: E402
from .types import ScalarType, TensorType
from .verify import verify
from .wkv import WkvAttrs

__all__ = [
    "FAMILIES",
    "TRANSFORM",
    "DotExpAttrs",
    "FamilyAttrs",
    "Lowering",
    "MlpAttrs",
    "LoweringSpec",
    "REGISTRY",
    "TARGETS",
    "Target",
    "GatedAttrs",
    "Node",
    "Program",
    "ScalarType",
    "SsmAttrs",
    "StationaryAttrs",
    "TensorType",
    "Value",
    "get_target",
    "lowering",
    "lowerings",
    "register_lowering",
    "Weight",
    "WkvAttrs",
    "parse",
    "parse_lowering",
    "print_program",
    "register_family",
    "verify",
]
