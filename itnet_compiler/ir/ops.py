"""Names of generic ops in the IR and the callables they stand for: an explicit allow-list.

A program's text names every callable it runs, and a bundle may come from anyone, so a name resolves only to a
callable known to be pure: an ATen operator (``aten.add.Tensor``: ``aten.name.overload``) that neither reads nor
writes files, prints or takes storages, the integer/float arithmetic of ``operator`` and ``math`` that torch.export
leaves in graphs with symbolic sizes, a few conversions of ``builtins``, and ``torch.sym_*`` helpers. Everything else
(``builtins.eval``, ``exec``, ``getattr``, ``__import__``, ``open``, ``operator.attrgetter``/``methodcaller``,
other ``torch.ops`` namespaces) is refused, by name, before anything is called. Integer power and the like are
wrapped so that a hostile literal cannot make them run for hours.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable

import torch

# Results of integer arithmetic in a program are sizes, indices or counts; anything past this is hostile input.
INT_LIMIT = 2**63


def _pow(a: object, b: object) -> object:
    """``operator.pow`` that refuses integer results beyond 64 bits instead of computing them for hours."""
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 and b * (abs(a).bit_length() - 1) >= 64:
        raise ValueError(f"integer power {a} ** {b} is beyond 64 bits")
    return operator.pow(a, b)


def _lshift(a: object, b: object) -> object:
    if isinstance(a, int) and isinstance(b, int) and b >= 64:
        raise ValueError(f"integer shift {a} << {b} is beyond 64 bits")
    return operator.lshift(a, b)


_OPERATOR = (
    "add sub mul truediv floordiv mod neg pos abs eq ne lt le gt ge and_ or_ xor not_ invert rshift getitem "
    "matmul truth"
).split()
_MATH = "ceil floor trunc sqrt exp log log2 log10 sin cos tan tanh isnan isinf isfinite fabs copysign".split()
_BUILTINS = "abs min max int float bool round".split()
_TORCH_HELPERS = ("sym_max", "sym_min", "sym_float", "sym_int", "sym_not", "sym_ite", "sym_sum", "sym_sqrt")

# name -> callable: the only non-ATen callables a program may name.
PURE: dict[str, Callable[..., object]] = {
    **{f"operator.{n}": getattr(operator, n) for n in _OPERATOR},
    "operator.pow": _pow,
    "operator.lshift": _lshift,
    **{f"math.{n}": getattr(math, n) for n in _MATH},
    **{f"builtins.{n}": getattr(builtins, n) for n in _BUILTINS},
    **{f"torch.{n}": getattr(torch, n) for n in _TORCH_HELPERS},
}
_NAMES = {fn: name for name, fn in PURE.items() if name not in ("operator.pow", "operator.lshift")}
_NAMES[operator.pow] = "operator.pow"
_NAMES[operator.lshift] = "operator.lshift"

# ATen operators with effects beyond their result: file reads/writes, printing, storage handles.
_ATEN_DENIED = frozenset({"from_file", "_print", "save", "load", "_debug_has_internal_overlap"})


def op_name(target: object) -> str:
    """The IR name of a call target of an exported graph; ValueError for one outside the allow-list."""
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)
        resolve_op(name)
        return name
    try:
        return _NAMES[target]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ValueError(f"cannot name call target {target!r}") from None


def resolve_op(op: str) -> Callable[..., object]:
    """The callable for a generic op name; ValueError (naming the op) if it is not on the allow-list."""
    fn = PURE.get(op)
    if fn is not None:
        return fn
    ns, _, rest = op.partition(".")
    if ns in ("operator", "_operator", "math", "builtins", "torch"):
        raise ValueError(f"op {op!r} is not on the allow-list of pure callables a program may run")
    if ns != "aten":
        raise ValueError(f"unknown op {op!r}: generic ops are aten.name.overload or allow-listed operator/math ops")
    parts = rest.split(".")
    if len(parts) != 2 or not all(p.isidentifier() for p in parts):
        raise ValueError(f"unknown op {op!r}: expected aten.name.overload")
    if parts[0] in _ATEN_DENIED or parts[0].startswith("_debug"):
        raise ValueError(f"op {op!r} has effects beyond its result (files, printing) and is never run")
    try:
        packet = getattr(torch.ops.aten, parts[0])
        fn = getattr(packet, parts[1])
    except (AttributeError, RuntimeError):
        raise ValueError(f"unknown op {op!r}") from None
    if not isinstance(fn, torch._ops.OpOverload):
        raise ValueError(f"unknown op {op!r}")
    if any("Storage" in str(a.type) for a in fn._schema.arguments):
        raise ValueError(f"op {op!r} takes a raw storage and is never run")
    return fn


def returns_list(op: str) -> bool:
    """Whether a generic op returns several values (a tuple, or a ``Tensor[]`` such as ``unbind``, ``split``): its IR
    outputs are then the elements, even when there is only one."""
    try:
        fn = resolve_op(op)
    except ValueError:
        return False
    if not isinstance(fn, torch._ops.OpOverload):
        return False
    rets = fn._schema.returns
    return len(rets) > 1 or (len(rets) == 1 and isinstance(rets[0].type, torch.ListType))
