"""Typed, range-checked fields of frozen records: family attributes and lowering options share them.

A record declares each field's type (int, float, bool, str, tuple[T, ...], tuple[A, B]) and, in the field's metadata,
its bounds (``range`` for numbers, ``choices`` for strings) and, for lowering options a tuner may search, ``tune``:
the interval (numbers, searched on a log scale) or the values (strings) worth trying. ``checked`` enforces type and
bounds whoever builds the record (a pass, a plan, hostile text).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import field
from functools import cache

from ..errors import ItnetError

# Attribute integers are sizes, counts and offsets of real layers; 2**31 keeps every derived loop and shape sane.
INT_ATTR = (0, 2**31 - 1)
MAX_STR_ATTR = 200


def at_least(default: int, lo: int, hi: int = INT_ATTR[1]):
    """A dataclass field for an integer attribute (or each entry of a tuple of them) in [lo, hi]."""
    return field(default=default, metadata={"range": (lo, hi)})


def one_of(default: str, *choices: str):
    """A dataclass field for a string attribute with a fixed set of values."""
    return field(default=default, metadata={"choices": (default, *choices)})


def option(
    default: object,
    doc: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] | tuple[int, ...] | None = None,
    tune: tuple[object, ...] | None = None,
):
    """A lowering option: its default, a one-line ``doc``, its bounds (numbers: [lo, hi]; strings: ``choices``,
    the default first) and, when a tuner may search it, ``tune`` (a number interval, or string values)."""
    meta: dict[str, object] = {"doc": doc}
    if lo is not None or hi is not None:
        meta["range"] = (INT_ATTR[0] if lo is None else lo, INT_ATTR[1] if hi is None else hi)
    if choices is not None:
        meta["choices"] = (default, *(c for c in choices if c != default))
    if tune is not None:
        meta["tune"] = tune
    return field(default=default, metadata=meta)


@cache
def hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def check_fields(record: object, what: typing.Callable[[str], str]) -> None:
    """Type- and range-check every field of a frozen dataclass in place (``__post_init__`` of records);
    ``what(field name)`` names the field in the error."""
    h = hints(type(record))
    for f in dataclasses.fields(record):  # type: ignore[arg-type]
        val = getattr(record, f.name)
        out = checked(what(f.name), h[f.name], val, f.metadata)
        if out is not val:
            object.__setattr__(record, f.name, out)


def checked(what: str, hint: object, val: object, meta: typing.Mapping[str, object]) -> object:
    """``val`` as the type ``hint`` (int, float, bool, str, tuple[T, ...], tuple[A, B], or a class with ``parse``)
    within ``meta``'s bounds; ValueError naming ``what`` otherwise."""
    if isinstance(hint, type) and hasattr(hint, "parse") and not isinstance(val, hint):
        if not isinstance(val, str):
            raise ValueError(f"{what} must be a string (a lowering spec), not {short(val)}")
        return hint.parse(val)  # type: ignore[attr-defined]
    if isinstance(hint, type) and hasattr(hint, "parse"):
        return val
    if hint is bool:
        if not isinstance(val, bool):
            raise ValueError(f"{what} must be true or false, not {short(val)}")
        return val
    if hint is int:
        lo, hi = meta.get("range", INT_ATTR)  # type: ignore[misc]
        if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= hi:
            raise ValueError(f"{what} must be an integer in [{lo}, {hi}], not {short(val)}")
        choices = meta.get("choices")
        if choices is not None and val not in choices:
            raise ValueError(f"{what} must be one of {', '.join(map(str, choices))}, not {val}")  # type: ignore[arg-type]
        return val
    if hint is float:
        if not isinstance(val, (int, float)) or isinstance(val, bool) or math.isnan(val):
            raise ValueError(f"{what} must be a number, not {short(val)}")
        bounds = meta.get("range")
        if bounds is not None and not bounds[0] <= val <= bounds[1]:  # type: ignore[index]
            raise ValueError(f"{what} must be a number in [{bounds[0]}, {bounds[1]}], not {short(val)}")  # type: ignore[index]
        return float(val)
    if hint is str:
        choices = meta.get("choices")
        if not isinstance(val, str) or len(val) > MAX_STR_ATTR:
            raise ValueError(f"{what} must be a string of at most {MAX_STR_ATTR} characters, not {short(val)}")
        if choices is not None and val not in choices:
            raise ValueError(f"{what} must be one of {', '.join(choices)}, not {val!r}")  # type: ignore[arg-type]
        return val
    args = typing.get_args(hint)
    if typing.get_origin(hint) is not tuple or not isinstance(val, (tuple, list)):
        raise ValueError(f"{what} must be a list, not {short(val)}")
    if len(args) == 2 and args[1] is Ellipsis:
        if len(val) > 8:
            raise ValueError(f"{what} has {len(val)} entries; at most 8")
        kinds = [args[0]] * len(val)
    elif len(val) != len(args):
        raise ValueError(f"{what} must have {len(args)} entries, not {len(val)}")
    else:
        kinds = list(args)
    items = tuple(checked(what, k, v, meta) for k, v in zip(kinds, val, strict=True))
    return val if isinstance(val, tuple) and all(a is b for a, b in zip(items, val, strict=True)) else items


def short(val: object) -> str:
    text = repr(val)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every lowering's options record: frozen, typed, checked on construction."""

    lowering: typing.ClassVar[str] = "lowering"

    def __post_init__(self) -> None:
        check_fields(self, lambda name: f"{self.lowering} option {name}")

    @classmethod
    def make(cls, layer: str = "", **opts: object) -> Options:
        """Validated options from spec keywords; every bad key or value is one ItnetError naming the layer."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(opts) - set(known))
        if unknown:
            listed = ", ".join(known) or "none"
            raise ItnetError(f"unknown {cls.lowering} option(s) {unknown}; known: {listed}", layer=layer or None)
        h = hints(cls)
        try:
            return cls(**{k: coerce(h[k], v) for k, v in opts.items()})
        except ValueError as e:
            raise ItnetError(str(e), layer=layer or None) from None


def coerce(hint: object, val: object) -> object:
    """Spec text is untyped (``seed=0``): a bool field takes 0/1/true/false, a float field an integer."""
    if hint is bool and val in (0, 1, "true", "false", "True", "False") and not isinstance(val, bool):
        return val in (1, "true", "True")
    return val


def describe(cls: type) -> list[dict[str, object]]:
    """One row per field of a record: name, type, default, bounds, tune space and doc (``itnet lowerings``)."""
    rows = []
    h = hints(cls)
    for f in dataclasses.fields(cls):
        hint = h[f.name]
        rows.append(
            {
                "name": f.name,
                "type": getattr(hint, "__name__", str(hint)),
                "default": f.default,
                "range": f.metadata.get("range"),
                "choices": f.metadata.get("choices"),
                "tune": f.metadata.get("tune"),
                "doc": f.metadata.get("doc", ""),
            }
        )
    return rows
