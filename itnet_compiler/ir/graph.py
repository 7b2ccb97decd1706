"""A networkx view of a Program for graph queries (reachability, layer grouping, cycles in rewrites)."""

from __future__ import annotations

import networkx as nx

from .core import Program


def to_networkx(prog: Program) -> nx.DiGraph:
    """Nodes are SSA value names (inputs, weights, node results); an edge runs from each operand to each result.

    Node attributes: ``op`` (``input``, ``param``/``buffer``/``const``, or the op name), ``layer``, ``family``.
    """
    g = nx.DiGraph()
    for v in prog.inputs:
        g.add_node(v.name, op="input", layer="", family=None)
    for w in prog.weights:
        g.add_node(w.value.name, op=w.kind, layer="", family=None)
    for n in prog.nodes:
        for out in n.outputs:
            g.add_node(out.name, op=n.op, layer=n.layer, family=n.family)
            for v in n.input_values():
                g.add_edge(v.name, out.name)
    return g
