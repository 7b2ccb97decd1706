"""Pytree specs (the structure of a model's inputs and outputs) as plain JSON, and back.

A leaf is ``"*"``; a node is ``{"type": "module.QualName", "context": ..., "children": [...]}``. Types are looked up
by import and must be registered pytree nodes (tuple, list, dict, namedtuples, transformers ModelOutput, ...):
nothing is unpickled.
"""

from __future__ import annotations

import importlib

import torch.utils._pytree as pytree

from ..errors import ItnetError

LEAF = "*"


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _import_type(name: str) -> type:
    mod, _, qual = name.rpartition(".")
    while mod:
        try:
            obj: object = importlib.import_module(mod)
            break
        except ImportError:
            mod, _, head = mod.rpartition(".")
            qual = f"{head}.{qual}"
    else:
        raise ItnetError(f"cannot import the output type {name}; install the package that defines it")
    for part in qual.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ItnetError(f"cannot find the type {name}; is the same library version installed?")
    assert isinstance(obj, type)
    return obj


def to_json(spec: pytree.TreeSpec) -> object:
    if spec.is_leaf():
        return LEAF
    ctx = spec.context
    if isinstance(ctx, type):
        ctx = {"type": _qualname(ctx)}
    elif ctx is not None and not isinstance(ctx, (list, tuple, str, int)):
        raise ItnetError(f"cannot record the pytree context {ctx!r} of {spec.type.__name__}; return plain containers")
    return {
        "type": _qualname(spec.type),
        "context": list(ctx) if isinstance(ctx, tuple) else ctx,
        "children": [to_json(c) for c in spec.children()],
    }


def from_json(data: object) -> pytree.TreeSpec:
    if data == LEAF:
        return pytree.treespec_leaf()
    if not isinstance(data, dict) or "type" not in data:
        raise ItnetError("malformed signature in the IR: expected '*' or a {type, context, children} object")
    t = _import_type(data["type"])
    if t not in pytree.SUPPORTED_NODES:
        raise ItnetError(f"{data['type']} is not a registered pytree type; import the library that registers it")
    ctx = data.get("context")
    if isinstance(ctx, dict) and "type" in ctx:
        ctx = _import_type(ctx["type"])
    return pytree.TreeSpec(t, ctx, [from_json(c) for c in data.get("children", [])])


def num_leaves(data: object) -> int:
    if data == LEAF:
        return 1
    assert isinstance(data, dict)
    return sum(num_leaves(c) for c in data.get("children", []))
