"""The integral-transform IR: types, program, families, printer, parser, verifier, bundles."""

from .core import TRANSFORM, Node, Program, Value, Weight
from .families import FAMILIES, DotExpAttrs, FamilyAttrs, StationaryAttrs, parse_lowering, register_family
from .parser import parse
from .printer import print_program
from .recurrent import GatedAttrs, SsmAttrs
from .types import ScalarType, TensorType
from .verify import verify

__all__ = [
    "FAMILIES",
    "TRANSFORM",
    "DotExpAttrs",
    "FamilyAttrs",
    "GatedAttrs",
    "Node",
    "Program",
    "ScalarType",
    "SsmAttrs",
    "StationaryAttrs",
    "TensorType",
    "Value",
    "Weight",
    "parse",
    "parse_lowering",
    "print_program",
    "register_family",
    "verify",
]
