"""The registry of torch implementations of each (family, lowering).

Implementations are registered next to their code (``conv.py``, ``attention.py``, ...) with ``register(family,
name, tiles=...)``, which also records them in the torch targets (``ir/target.py``: torch-cpu, torch-cuda). An
entry takes the node and returns the callable the generated FX graph calls (with the node's inputs in role order)
and its static keyword options; it also receives the lowering's typed options (defaults filled in).
The spec's options are checked against the lowering's record (``ir/lowering.py``)
and reach the callable as typed keywords; ``tiles`` names the extra options only this implementation reads.
"""

from __future__ import annotations

from collections.abc import Callable

from ...errors import ItnetError
from ...ir.core import Node
from ...ir.fields import Options
from ...ir.lowering import REGISTRY, LoweringSpec
from ...ir.target import TARGETS

Impl = Callable[..., object]
# (node, its typed options) -> (the callable, its static keywords); the spec's own options are added to those.
Entry = Callable[[Node, Options], tuple[Impl, dict[str, object]]]
LOWERINGS: dict[tuple[str, str], Entry] = {}
TORCH_TARGETS = ("torch-cpu", "torch-cuda")
TILE_RANGE = (1, 1 << 20)


def register(family: str, name: str, tiles: tuple[str, ...] = ()):
    """Register the torch implementation of (family, name); the lowering's record must exist."""

    def deco(fn: Entry) -> Entry:
        if (family, name) not in REGISTRY:
            raise ValueError(f"no lowering record for ({family}, {name}); register_lowering it first")
        LOWERINGS[(family, name)] = fn
        for t in TORCH_TARGETS:
            TARGETS[t].add(family, name, tiles)
        return fn

    return deco


def spec_options(
    node: Node, spec: LoweringSpec, tiles: frozenset[str], typed: Options | None = None
) -> dict[str, object]:
    """The spec's options as typed keywords: record options with their declared types (``typed``: the record's
    options already made from the spec), tiles as checked integers. One ItnetError naming the layer and the valid
    options otherwise."""
    if typed is None:
        typed = REGISTRY[(node.family, spec.name)].make(spec, node.name, tiles)
    out: dict[str, object] = {}
    lo, hi = TILE_RANGE
    for key, val in spec.options:
        if key in tiles and not hasattr(typed, key):
            if not isinstance(val, int) or not lo <= val <= hi:
                raise ItnetError(f"tile option {key} of '{spec.name}' must be an integer in [{lo}, {hi}], not {val!r}",
                                 layer=node.layer or None)  # fmt: skip
            out[key] = val
        else:
            out[key] = getattr(typed, key)
    return out


def implementation(node: Node) -> tuple[Impl, dict[str, object]]:
    spec = node.attrs.lowering
    entry = LOWERINGS.get((node.family, spec.name))
    if entry is None:
        have = sorted(n for f, n in LOWERINGS if f == node.family)
        raise ItnetError(
            f"the torch backend has no '{spec.name}' lowering for family {node.family}; use one of {', '.join(have)}",
            layer=node.layer,
        )
    tiles = TARGETS[TORCH_TARGETS[0]].tiles(node.family, spec.name)
    typed = REGISTRY[(node.family, spec.name)].make(spec, node.name, tiles)
    impl, static = entry(node, typed)
    return impl, {**static, **spec_options(node, spec, tiles, typed)}
