"""The rewrite driver: rules are data, a table of (ops, function) pairs applied to a fixed point.

A rule function gets a ``Match`` (the program, the node, and use/producer maps) and returns a ``Rewrite`` or ``None``.
A ``Rewrite`` lists new nodes (inserted where the matched node stood) and which old values they replace. Dead nodes
left behind are removed by ``cleanup.dce`` after the driver finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..ir.core import Node, Program, Value, substitute
from ..ir.ops import resolve_op


@dataclass
class Match:
    prog: Program
    node: Node
    producers: dict[Value, Node]
    users: dict[Value, list[Node]]
    outputs: set[Value]

    _taken: set[str] | None = None

    def fresh(self, base: str) -> str:
        """A value name not used in the program nor handed out before by this match."""
        if self._taken is None:
            self._taken = {v.name for v in self.prog.values()}
        name, k = base, 0
        while name in self._taken:
            k += 1
            name = f"{base}_{k}"
        self._taken.add(name)
        return name

    def producer(self, v: object) -> Node | None:
        return self.producers.get(v) if isinstance(v, Value) else None

    def only_user(self, v: Value) -> Node | None:
        """The single node reading ``v``, or None if there are several readers or ``v`` is a program output."""
        us = self.users.get(v, []) if isinstance(v, Value) else []
        if len(us) != 1 or v in self.outputs:
            return None
        return us[0]

    def n_uses(self, v: Value) -> int:
        if not isinstance(v, Value):
            return 0
        return len(self.users.get(v, [])) + (v in self.outputs)


@dataclass
class Rewrite:
    nodes: list[Node]
    replace: dict[Value, Value] = field(default_factory=dict)


Rule = tuple[tuple[str, ...], Callable[[Match], Rewrite | None]]


def apply_rules(prog: Program, rules: Sequence[Rule], max_rounds: int = 20) -> int:
    """Apply ``rules`` until none fires; returns the number of rewrites. Mutates ``prog``.

    The matched node is removed when the rewrite replaces all of its results; other nodes it leaves dead are for
    ``cleanup.dce``.
    """
    count = 0
    for _ in range(max_rounds):
        fired = False
        i = 0
        maps = None
        while i < len(prog.nodes):
            node = prog.nodes[i]
            if maps is None:
                maps = (prog.producers(), prog.users(), prog.output_ids())
            rw = _try(prog, node, rules, maps)
            if rw is None:
                i += 1
                continue
            whole = all(v in rw.replace for v in node.outputs)
            prog.nodes[i : i + 1] = rw.nodes if whole else [*rw.nodes, node]
            mapping = dict(rw.replace)
            new = {n for n in rw.nodes}
            for n in prog.nodes:
                if n not in new:
                    n.replace_uses(mapping)
            prog.outputs = [substitute(a, mapping) for a in prog.outputs]
            count += 1
            fired = True
            maps = None
            i += len(rw.nodes) + (0 if whole else 1)
        if not fired:
            break
    return count


def _try(prog: Program, node: Node, rules: Sequence[Rule], maps: tuple) -> Rewrite | None:
    for ops, fn in rules:
        if node.op not in ops:
            continue
        rw = fn(Match(prog, node, *maps))
        if rw is not None:
            return rw
    return None


def bind(node: Node) -> dict[str, object]:
    """Arguments of a generic ATen node by schema name, defaults filled in."""
    fn = resolve_op(node.op)
    assert isinstance(fn, torch._ops.OpOverload)
    out: dict[str, object] = {}
    for i, a in enumerate(fn._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out
