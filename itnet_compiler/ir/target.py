"""Targets: what each backend runs, its exact defaults and preferences, and its device ceilings.

A ``Target`` lists the (family, lowering) records it implements natively, each with the extra options its
implementation reads (``tiles``: Triton block sizes, torch tile rows), and the lowering names it hands to another
target by design (the Triton target runs ``library``, ``dense`` and ``fft`` on torch: vendor work, not a fallback;
an entry ``family:name`` delegates one family's lowering only, e.g. ``mlp:montecarlo``).
Every pass that picks a lowering reads the target: ``resolve-auto`` takes the first exact lowering of the family's
``defaults`` the node admits, ``choose-lowering`` ranks only what the target implements natively (ties broken by
``preference``) against its ``ceilings``, and a plan may name only what the target runs.

The backends fill ``runs`` as they register their implementations (``backends/torch/registry.py``,
``backends/triton/codegen.py``); ``get_target`` makes sure they have been imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ItnetError
from .cost import Ceilings
from .lowering import REGISTRY, names

if TYPE_CHECKING:
    from .families import FamilyAttrs


@dataclass
class Target:
    name: str
    backend: str  # which ``build`` backend compiles for it: torch | triton
    doc: str
    defaults: dict[str, tuple[str, ...]]  # family -> exact lowerings for ``auto``, most preferred first
    preference: tuple[str, ...]  # among equal predicted times, earlier names win
    ceilings: Ceilings
    delegates: tuple[str, ...] = ()  # lowering names, or "family:name", run by ``delegate_to`` by design
    delegate_to: str | None = None
    runs: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)  # native -> tile options

    def add(self, family: str, name: str, tiles: frozenset[str] | set[str] | tuple[str, ...] = ()) -> None:
        self.runs[(family, name)] = frozenset(tiles)

    def forget(self, family: str, name: str) -> None:
        self.runs.pop((family, name), None)

    def native(self, family: str, name: str) -> bool:
        return (family, name) in self.runs and (family, name) in REGISTRY

    def delegated(self, family: str, name: str) -> bool:
        other = TARGETS.get(self.delegate_to or "")
        named = name in self.delegates or f"{family}:{name}" in self.delegates
        return named and other is not None and other.native(family, name)

    def can_run(self, family: str, name: str) -> bool:
        return self.native(family, name) or self.delegated(family, name)

    def tiles(self, family: str, name: str) -> frozenset[str]:
        if self.delegated(family, name):
            return TARGETS[self.delegate_to or ""].tiles(family, name)
        return self.runs.get((family, name), frozenset())

    def choices(self, family: str) -> list[str]:
        """The lowerings of ``family`` a plan may name for this target."""
        return [n for n in names(family) if self.can_run(family, n)]

    def candidates(self, family: str) -> list[str]:
        """What ``choose-lowering`` may pick for ``family``: the native lowerings, in preference order."""
        native = [n for n in names(family) if self.native(family, n)]
        rank = {n: i for i, n in enumerate(self.preference)}
        return sorted(native, key=lambda n: rank.get(n, len(rank)))

    def rank(self, name: str) -> int:
        return self.preference.index(name) if name in self.preference else len(self.preference)

    def exact_default(self, attrs: FamilyAttrs, layer: str = "") -> str:
        """The exact lowering ``auto`` becomes: the family's defaults first, then any other exact native one, then
        the delegated ones (a layer no native lowering admits, e.g. attention that returns its weights)."""
        family = attrs.family
        order = list(dict.fromkeys([*self.defaults.get(family, ()), *self.candidates(family), *names(family)]))
        other = TARGETS.get(self.delegate_to or "")
        handed = [*other.defaults.get(family, ()), *other.candidates(family)] if other is not None else []
        for runs, ordered in ((self.native, order), (self.delegated, list(dict.fromkeys([*handed, *order])))):
            for n in ordered:
                rec = REGISTRY.get((family, n))
                if rec is not None and rec.exact and runs(family, n) and rec.why_not(attrs) is None:
                    return n
        raise ItnetError(
            f"no exact lowering of family {family} runs on target {self.name} for this layer; "
            f"lowerings here: {', '.join(self.choices(family)) or 'none'}",
            layer=layer or None,
        )


_CPU = Ceilings()
# An H100/H200-class card (bf16 dense ≈ 5e14 FLOP/s reached by the best attention kernels, ≈ 3.3e12 B/s HBM).
_GPU = Ceilings(flops_per_s=5e14, bytes_per_s=3.3e12)
_TORCH_DEFAULTS = {
    "stationary": ("library",),
    "dot_exp": ("library",),
    "ssm": ("scan",),
    "gated": ("library",),
    "wkv": ("scan",),
    "mlp": ("fused",),
}
_TORCH_PREFERENCE = ("library", "fused", "fft", "dense", "scan", "chunked", "lowrank", "montecarlo")

TARGETS: dict[str, Target] = {
    "torch-cpu": Target(
        "torch-cpu", "torch", "the torch backend on the CPU (the reference)", _TORCH_DEFAULTS, _TORCH_PREFERENCE, _CPU
    ),
    "torch-cuda": Target(
        "torch-cuda", "torch", "the torch backend on a CUDA device", _TORCH_DEFAULTS, _TORCH_PREFERENCE, _GPU
    ),
    "triton": Target(
        "triton",
        "triton",
        "generated Triton kernels (GPU, or the CPU under TRITON_INTERPRET=1)",
        {
            "stationary": ("fused",),
            "dot_exp": ("fused",),
            "ssm": ("scan",),
            "gated": ("scan",),
            "wkv": ("scan",),
            "mlp": ("fused",),
        },
        ("fused", "scan", "chunked", "lowrank", "montecarlo"),
        _GPU,
        delegates=("library", "dense", "fft", "mlp:montecarlo", "mlp:lowrank"),
        delegate_to="torch-cuda",
    ),
}
BACKEND_TARGET = {"torch": "torch-cpu", "triton": "triton"}

# Set by the package (``api.py``): imports the backends, whose registrations fill ``runs``.
LOADER: list[Callable[[], None]] = []
_loaded: list[bool] = []


def ensure_loaded() -> None:
    if not _loaded:
        _loaded.append(True)
        for load in LOADER:
            load()


def get_target(name: str = "torch") -> Target:
    """A target by name, or the default target of a backend name (torch -> torch-cpu)."""
    ensure_loaded()
    t = TARGETS.get(BACKEND_TARGET.get(name, name))
    if t is None:
        have = ", ".join([*BACKEND_TARGET, *(n for n in TARGETS if n not in BACKEND_TARGET)])
        raise ItnetError(f"unknown backend or target {name!r}; available: {have}")
    return t


def tiles_anywhere(family: str, name: str) -> frozenset[str]:
    """Options some target reads for (family, name) beyond the record's (the verifier does not know the target)."""
    ensure_loaded()
    out: frozenset[str] = frozenset()
    for t in TARGETS.values():
        out |= t.runs.get((family, name), frozenset())
    return out
