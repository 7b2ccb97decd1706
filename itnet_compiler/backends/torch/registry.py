"""The registry of torch implementations of each (family, lowering).

Implementations are registered next to their code (``conv.py``, ``attention.py``, ...) in ``LOWERINGS[(family,
name)]``. Each entry takes the node and returns the callable the generated FX graph calls (with the node's inputs in
role order) and its static keyword options; ``OPTIONS`` lists the spec options (``fused:block_q=128``) it accepts.
"""

from __future__ import annotations

from collections.abc import Callable

from ...errors import ItnetError
from ...ir.core import Node
from ...ir.families import parse_lowering

Impl = Callable[..., object]
LOWERINGS: dict[tuple[str, str], Callable[[Node], tuple[Impl, dict[str, object]]]] = {}


def register(family: str, name: str, options: tuple[str, ...] = ()):
    def deco(fn):
        LOWERINGS[(family, name)] = fn
        OPTIONS[(family, name)] = set(options)
        return fn

    return deco


def implementation(node: Node) -> tuple[Impl, dict[str, object]]:
    name, opts = parse_lowering(node.attrs.lowering)
    entry = LOWERINGS.get((node.family, name))
    if entry is None:
        have = sorted(n for f, n in LOWERINGS if f == node.family)
        raise ItnetError(
            f"the torch backend has no '{name}' lowering for family {node.family}; use one of {', '.join(have)}",
            layer=node.layer,
        )
    impl, static = entry(node)
    known = OPTIONS.get((node.family, name), set())
    bad = set(opts) - known
    if bad:
        raise ItnetError(
            f"unknown option(s) {sorted(bad)} for lowering '{name}'; known: {sorted(known)}", layer=node.layer
        )
    return impl, {**static, **opts}


OPTIONS: dict[tuple[str, str], set[str]] = {}
