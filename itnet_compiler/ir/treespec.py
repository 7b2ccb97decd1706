"""Pytree specs (the structure of a model's inputs and outputs) as plain JSON, and back.

A leaf is ``"*"``; a node is ``{"type": "module.QualName", "context": ..., "children": [...]}``. A spec read from a
bundle rebuilds only a fixed set of container types, and reading one never imports code named by the bundle:
tuple, list, dict, OrderedDict, deque, ``torch.Size``, FX's immutable containers, torch's return types
(``torch.return_types.max``), namedtuples (rebuilt from their recorded field names as a fresh namedtuple, since the
original class lives in the user's code), and the ``ModelOutput`` classes of the installed transformers package.
Nothing is unpickled.
"""

from __future__ import annotations

import collections
import importlib
import keyword
from functools import lru_cache

import torch
import torch.fx.immutable_collections as fx_containers
import torch.utils._pytree as pytree

from ..errors import ItnetError

LEAF = "*"
NAMEDTUPLE = "collections.namedtuple"
MAX_DEPTH = 64

_FIXED: dict[str, object] = {
    "builtins.tuple": tuple,
    "builtins.list": list,
    "builtins.dict": dict,
    "collections.OrderedDict": collections.OrderedDict,
    "collections.deque": collections.deque,
    "torch.Size": torch.Size,
    "torch.fx.immutable_collections.immutable_list": fx_containers.immutable_list,
    "torch.fx.immutable_collections.immutable_dict": fx_containers.immutable_dict,
}
_ALLOWED = "plain containers, namedtuples, torch return types and transformers model outputs"


def _qualname(t: object) -> str:
    return f"{t.__module__}.{t.__qualname__}"  # type: ignore[attr-defined]


def _dotted(name: str) -> bool:
    return all(p.isidentifier() and not keyword.iskeyword(p) for p in name.split("."))


def _resolve_type(name: object) -> object:
    """The container type a spec names, from the fixed set only (see the module docstring)."""
    if not isinstance(name, str) or not _dotted(name):
        raise ItnetError(f"malformed signature in the IR: bad type name {str(name)[:60]!r}")
    if name in _FIXED:
        return _FIXED[name]
    if name == NAMEDTUPLE:
        return collections.namedtuple
    prefix = "torch.return_types."
    if name.startswith(prefix):
        t = getattr(torch.return_types, name[len(prefix) :], None)
        if isinstance(t, type) and t in pytree.SUPPORTED_NODES:
            return t
    if name.startswith("transformers."):
        return _model_output(name)
    raise ItnetError(f"the signature names the type {name[:80]}, which itnet does not rebuild (it rebuilds {_ALLOWED})")


def _model_output(name: str) -> type:
    """A ``ModelOutput`` subclass of the installed transformers (its own modules only; nothing from the bundle)."""
    mod, _, cls = name.rpartition(".")
    try:
        from transformers.utils import ModelOutput

        obj = getattr(importlib.import_module(mod), cls, None)
    except ImportError:
        raise ItnetError(
            f"the output type {name} needs transformers ({mod}); pip install 'itnet-compiler[hf]'"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, ModelOutput)):
        raise ItnetError(f"{name} is not a transformers ModelOutput class; is the same transformers version installed?")
    if obj not in pytree.SUPPORTED_NODES:
        raise ItnetError(f"{name} is not a registered pytree type in this transformers version")
    return obj


@lru_cache(maxsize=256)
def _namedtuple(name: str, fields: tuple[str, ...]) -> type:
    return collections.namedtuple(name, fields)


def to_json(spec: pytree.TreeSpec) -> object:
    if spec.is_leaf():
        return LEAF
    ctx = spec.context
    if spec.type is collections.namedtuple:
        assert isinstance(ctx, type)
        ctx = {"namedtuple": ctx.__name__, "fields": list(ctx._fields)}  # type: ignore[attr-defined]
    elif isinstance(ctx, type):
        ctx = {"type": _qualname(ctx)}
    elif ctx is not None and not isinstance(ctx, (list, tuple, str, int)):
        raise ItnetError(f"cannot record the pytree context {ctx!r} of {spec.type.__name__}; return plain containers")
    return {
        "type": _qualname(spec.type),
        "context": list(ctx) if isinstance(ctx, tuple) else ctx,
        "children": [to_json(c) for c in spec.children()],
    }


def from_json(data: object, depth: int = 0) -> pytree.TreeSpec:
    if data == LEAF:
        return pytree.treespec_leaf()
    if depth > MAX_DEPTH:
        raise ItnetError(f"malformed signature in the IR: nested deeper than {MAX_DEPTH} containers")
    if not isinstance(data, dict) or "type" not in data or not isinstance(data.get("children", []), list):
        raise ItnetError("malformed signature in the IR: expected '*' or a {type, context, children} object")
    t = _resolve_type(data["type"])
    children = data.get("children", [])
    ctx = _context(t, data.get("context"), len(children))
    return pytree.TreeSpec(t, ctx, [from_json(c, depth + 1) for c in children])


_KEYED = (dict, collections.OrderedDict, fx_containers.immutable_dict)


def _context(t: object, ctx: object, n: int) -> object:
    """Check a recorded context against its container type (a keyed container names one key per child; sequences
    record none); JSON gives only lists, strings, numbers and null."""
    keyed = t in _KEYED or (isinstance(t, type) and t.__module__.startswith("transformers."))
    if keyed and not (isinstance(ctx, list) and len(ctx) == n and len(set(map(repr, ctx))) == n):
        name = getattr(t, "__name__", t)
        raise ItnetError(f"malformed signature in the IR: a {name} needs one distinct key per child")
    if t in (tuple, list, torch.Size, fx_containers.immutable_list) and ctx is not None:
        raise ItnetError("malformed signature in the IR: a tuple or list records no context")
    if t is collections.deque and not (ctx is None or (isinstance(ctx, int) and not isinstance(ctx, bool))):
        raise ItnetError("malformed signature in the IR: a deque's context is its maxlen")
    if t is collections.namedtuple:
        fields = ctx.get("fields") if isinstance(ctx, dict) else None
        name = ctx.get("namedtuple") if isinstance(ctx, dict) else None
        ok = isinstance(name, str) and name.isidentifier() and isinstance(fields, list)
        if not ok or not all(isinstance(f, str) and f.isidentifier() and not keyword.iskeyword(f) for f in fields):
            raise ItnetError("malformed signature in the IR: a namedtuple needs its name and field names")
        return _namedtuple(name, tuple(fields))
    if isinstance(ctx, dict):
        raise ItnetError("malformed signature in the IR: a context is a list, a string, a number or null")
    if isinstance(ctx, list) and not all(isinstance(k, (str, int)) for k in ctx):
        raise ItnetError("malformed signature in the IR: dict keys must be strings or integers")
    return ctx


def num_leaves(data: object, depth: int = 0) -> int:
    if data == LEAF:
        return 1
    if not isinstance(data, dict) or not isinstance(data.get("children", []), list) or depth > MAX_DEPTH:
        raise ItnetError("malformed signature in the IR: expected '*' or a {type, context, children} object")
    return sum(num_leaves(c, depth + 1) for c in data.get("children", []))
