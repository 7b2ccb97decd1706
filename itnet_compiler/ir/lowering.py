"""The lowering registry: one ``Lowering`` record per (family, name), and the typed ``LoweringSpec`` a node carries.

A record says what a lowering is, independently of any backend: its typed options (an ``Options`` dataclass whose
fields carry type, default, bounds and, for tunable ones, the space a tuner searches), whether it is ``exact``, which
nodes it ``admits``, its ``cost`` rule (sympy FLOPs, bytes and a-priori error, ``ir/cost.py``) and, for
approximations, ``fit``: the cheapest options whose a-priori error meets a budget. Records are registered beside their
cost rules (``ir/lowerings/*.py``) with ``register_lowering``; which backend runs which record is said by the
``Target`` records (``ir/target.py``), which the backends fill as they register their implementations.

A spec is written ``name`` or ``name:key=value,...`` (``montecarlo:samples=128,seed=0``); values are integers,
numbers or words. Options a target reads beyond the record's (Triton tile sizes) are that target's ``tiles``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ItnetError
from .fields import MAX_STR_ATTR, Options, coerce, hints, short

if TYPE_CHECKING:
    from .core import Node
    from .cost import Cost, TensorLookup
    from .families import FamilyAttrs

AUTO = "auto"
_NAME = re.compile(r"[a-z_][a-z0-9_]*")
Value = int | float | str


@dataclass(frozen=True, eq=False)
class LoweringSpec:
    """A lowering name and its options in the order written; prints as ``name:key=value,...`` and parses back.
    Compares equal to its text, so ``node.attrs.lowering == "fused"`` reads naturally."""

    name: str = AUTO
    options: tuple[tuple[str, Value], ...] = ()

    @classmethod
    def parse(cls, text: str) -> LoweringSpec:
        """``name`` or ``name:key=value,...``; ValueError on anything else (names are lower-case identifiers)."""
        if not isinstance(text, str) or len(text) > MAX_STR_ATTR:
            raise ValueError(f"a lowering spec is text of at most {MAX_STR_ATTR} characters, not {short(text)}")
        name, _, rest = text.partition(":")
        name = name.strip()
        if not _NAME.fullmatch(name):
            raise ValueError(f"lowering name {name!r} is not a lower-case identifier (write e.g. 'fused')")
        opts: dict[str, Value] = {}
        for item in filter(None, (i.strip() for i in rest.split(","))):
            key, eq, val = item.partition("=")
            key = key.strip()
            if not eq or not _NAME.fullmatch(key):
                raise ValueError(f"lowering option {item!r} is not key=value")
            if key in opts:
                raise ValueError(f"lowering option {key!r} is given twice")
            opts[key] = _number(val.strip())
        return cls(name, tuple(opts.items()))

    @property
    def opts(self) -> dict[str, Value]:
        return dict(self.options)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_text(v)}" for k, v in self.options)

    def __repr__(self) -> str:
        return f"LoweringSpec({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return str(self) == other
        return isinstance(other, LoweringSpec) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def _number(text: str) -> Value:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _text(v: Value) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def parse_lowering(spec: str | LoweringSpec) -> tuple[str, dict[str, Value]]:
    """``name`` or ``name:key=value,...`` -> (name, options)."""
    s = spec if isinstance(spec, LoweringSpec) else LoweringSpec.parse(spec)
    return s.name, s.opts


@dataclass(frozen=True)
class NoOptions(Options):
    """A lowering without options."""


Admits = Callable[["FamilyAttrs", Options], "str | None"]
CostRule = Callable[["Node", Options, "TensorLookup | None"], "Cost | None"]
Fit = Callable[["Node", float, Mapping[str, int], "TensorLookup | None"], "dict[str, object] | None"]


@dataclass(frozen=True)
class Lowering:
    """What one (family, lowering) is, for every backend."""

    family: str
    name: str
    exact: bool
    options: type[Options] = NoOptions
    doc: str = ""
    # Why a node (its attributes, the chosen options) cannot take this lowering, or None.
    admits: Admits | None = None
    # FLOPs, bytes and a-priori error (0 when exact), or None where it does not apply; None: no cost rule.
    cost: CostRule | None = None
    # Approximations: the cheapest options meeting an error budget at given sizes, or None when none can.
    fit: Fit | None = None
    error_model: str = ""  # the a-priori error model in words (``itnet lowerings``)

    def parse_options(self, given: Mapping[str, Value], extra: frozenset[str] = frozenset()) -> Options:
        """Typed options from spec keywords; keys in ``extra`` (a target's tiles) are skipped. ValueError naming
        the valid options on an unknown key or a bad value."""
        known = [f.name for f in dataclasses.fields(self.options)]
        unknown = sorted(set(given) - set(known) - extra)
        if unknown:
            listed = ", ".join(sorted({*known, *extra})) or "none"
            raise ValueError(
                f"unknown option(s) {unknown} for lowering '{self.name}' of {self.family}; known: {listed}"
            )
        h = hints(self.options)
        kw = {k: coerce(h[k], v) for k, v in given.items() if k in known}
        return self.options(**kw)

    def make(self, spec: LoweringSpec | str, layer: str = "", extra: frozenset[str] = frozenset()) -> Options:
        """``parse_options`` of a spec, as one ItnetError naming the layer."""
        s = spec if isinstance(spec, LoweringSpec) else LoweringSpec.parse(spec)
        try:
            return self.parse_options(s.opts, extra)
        except ValueError as e:
            raise ItnetError(str(e), layer=layer or None) from None

    def why_not(self, attrs: FamilyAttrs, opts: Options | None = None) -> str | None:
        """Why ``attrs`` cannot take this lowering (the family's own rule first), or None."""
        reason = attrs.admits(self.name)
        if reason is None and self.admits is not None:
            reason = self.admits(attrs, opts if opts is not None else self.options())
        return reason


REGISTRY: dict[tuple[str, str], Lowering] = {}


def register_lowering(
    family: str,
    name: str,
    *,
    exact: bool,
    options: type[Options] = NoOptions,
    doc: str = "",
    admits: Admits | None = None,
    fit: Fit | None = None,
    error_model: str = "",
) -> Callable[[CostRule | None], CostRule | None]:
    """Register the record of (family, name); decorates its cost rule (``register_lowering(...)(None)``: no rule).
    Registering the same key again replaces the record (a user may refine a builtin)."""
    if not _NAME.fullmatch(name) or name == AUTO:
        raise ValueError(f"lowering name {name!r} must be a lower-case identifier other than 'auto'")

    def deco(cost: CostRule | None) -> CostRule | None:
        REGISTRY[(family, name)] = Lowering(
            family, name, exact, options, doc, admits, cost, fit, error_model or ("0 (exact)" if exact else "")
        )
        return cost

    return deco


def unregister_lowering(family: str, name: str) -> None:
    """Remove a record (tests that register their own)."""
    REGISTRY.pop((family, name), None)
    from .target import TARGETS

    for t in TARGETS.values():
        t.forget(family, name)


def names(family: str) -> tuple[str, ...]:
    """The registered lowerings of a family, in registration order."""
    return tuple(n for f, n in REGISTRY if f == family)


def lowering(family: str, name: str) -> Lowering:
    """The record of (family, name); ValueError naming the family's lowerings otherwise."""
    rec = REGISTRY.get((family, name))
    if rec is None:
        have = ", ".join((AUTO, *names(family)))
        raise ValueError(f"lowering {name!r} is not one of {have} (the lowerings of family {family})")
    return rec


def lowerings(family: str | None = None) -> list[Lowering]:
    """Every record, or those of one family."""
    return [r for (f, _), r in REGISTRY.items() if family is None or f == family]


def check_lowering(attrs: FamilyAttrs) -> None:
    """The verifier's rule for a node's lowering: a registered name of its family (or ``auto`` without options),
    options the record (or some target's tiles) knows, with valid values, and a node the lowering admits."""
    spec = attrs.lowering
    if spec.name == AUTO:
        if spec.options:
            raise ValueError("lowering 'auto' takes no options")
        return
    rec = lowering(attrs.family, spec.name)
    from .target import tiles_anywhere

    opts = rec.parse_options(spec.opts, tiles_anywhere(attrs.family, spec.name))
    reason = rec.why_not(attrs, opts)
    if reason:
        raise ValueError(f"lowering {spec.name!r} is not possible here: {reason}")
