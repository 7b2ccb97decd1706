"""Names of generic ops in the IR and the callables they stand for.

``aten.add.Tensor`` (any ``torch.ops`` namespace: ``ns.name.overload``), ``operator.mul``, ``math.ceil`` and
``torch.sym_max``-style helpers that torch.export leaves in graphs with symbolic sizes.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable

import torch

_MODULES = {"operator": operator, "_operator": operator, "math": math, "builtins": builtins}
_TORCH_HELPERS = {"sym_max", "sym_min", "sym_float", "sym_int", "sym_not", "sym_ite", "sym_sum", "sym_sqrt"}


def op_name(target: object) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    mod = getattr(target, "__module__", None)
    name = getattr(target, "__name__", None)
    if mod in _MODULES and name:
        return f"{'operator' if mod == '_operator' else mod}.{name}"
    if name in _TORCH_HELPERS:
        return f"torch.{name}"
    raise ValueError(f"cannot name call target {target!r}")


def resolve_op(op: str) -> Callable[..., object]:
    """The callable for a generic op name; ValueError if there is none."""
    ns, _, rest = op.partition(".")
    if ns in _MODULES:
        fn = getattr(_MODULES[ns], rest, None)
        if callable(fn):
            return fn
        raise ValueError(f"unknown op {op!r}")
    if ns == "torch" and rest in _TORCH_HELPERS:
        return getattr(torch, rest)
    parts = rest.split(".")
    if len(parts) != 2:
        raise ValueError(f"unknown op {op!r}: expected namespace.name.overload")
    try:
        packet = getattr(getattr(torch.ops, ns), parts[0])
        return getattr(packet, parts[1])
    except (AttributeError, RuntimeError):
        raise ValueError(f"unknown op {op!r}") from None


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
