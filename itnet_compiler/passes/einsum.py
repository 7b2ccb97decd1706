"""Canonicalise two-operand ``einsum`` calls that are batched matrix products into ``permute → matmul → permute``.

Expects: generic ATen nodes. Guarantees: valid IR, the same values; every ``aten.einsum`` over two operands whose
equation has one free index per operand, one contracted index, any number of batch indices present in both
operands and the result (same sizes: no broadcasting; an ellipsis is such batch indices), no repeated or
summed-away indices, becomes the equivalent matmul, so the attention recogniser sees XLNet's ``ibnd,jbnd->bnij``
scores and ``bnij,jbnd->ibnd`` weighted sums (and LongT5's blocked ``...qhd,...khd->...hqk``) as the products it
anchors on. Any other einsum stays as it is.
"""

from __future__ import annotations

from ..ir.core import Node, Value
from ..ir.types import TensorType
from .rewrite import Match, Rewrite, Rule


def _tt(v: object) -> TensorType | None:
    return v.type if isinstance(v, Value) and isinstance(v.type, TensorType) else None


def _parse(eq: object, ranks: tuple[int, int, int]) -> tuple[str, str, str] | None:
    """The equation's three index strings, an ellipsis spelled out as the same fresh (upper-case) indices in every
    operand, which then must hold the same number of dims there (no broadcasting)."""
    if not isinstance(eq, str) or "->" not in eq:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    ops = lhs.split(",")
    if len(ops) != 2:
        return None
    subs = [*ops, out]
    if any("..." in x for x in subs):
        extra = {r - len(x.replace("...", "")) for x, r in zip(subs, ranks, strict=True)}
        if len(extra) != 1 or not all(x.count("...") == 1 for x in subs) or not 0 <= min(extra) <= 8:
            return None
        fresh = "ABCDEFGH"[: extra.pop()]
        subs = [x.replace("...", fresh) for x in subs]
    if not all(x.isalpha() for x in subs if x):
        return None
    a, b, out = subs
    if any(len(set(s)) != len(s) for s in (a, b, out)) or not set(out) <= set(a) | set(b):
        return None
    return a, b, out


def _einsum(m: Match) -> Rewrite | None:
    node = m.node
    if len(node.args) < 2 or node.kwargs or (len(node.args) > 2 and node.args[2] is not None):
        return None
    operands = node.args[1]
    if not isinstance(operands, (list, tuple)) or len(operands) != 2:
        return None
    ta, tb, to = _tt(operands[0]), _tt(operands[1]), _tt(node.outputs[0])
    if ta is None or tb is None or to is None:
        return None
    eq = _parse(node.args[0], (ta.rank, tb.rank, to.rank))
    if eq is None:
        return None
    a, b, out = eq
    if ta.rank != len(a) or tb.rank != len(b) or to.rank != len(out):
        return None
    batch = [c for c in out if c in a and c in b]
    free_a = [c for c in a if c in out and c not in b]
    free_b = [c for c in b if c in out and c not in a]
    contract = [c for c in a if c in b and c not in out]
    if len(free_a) != 1 or len(free_b) != 1 or len(contract) != 1 or len(batch) + 2 != len(out):
        return None
    if len(batch) + 2 != len(a) or len(batch) + 2 != len(b):
        return None  # an index summed away in one operand only
    size = {c: ta.shape[a.index(c)] for c in a}
    if any(tb.shape[b.index(c)] != size[c] for c in b if c in size):
        return None  # broadcasting batch dims, or mismatched contraction
    size.update({c: tb.shape[b.index(c)] for c in b})
    nodes: list[Node] = []
    x = _permute(m, operands[0], a, [*batch, *free_a, *contract], size, ta, nodes)
    y = _permute(m, operands[1], b, [*batch, *contract, *free_b], size, tb, nodes)
    prod = "".join([*batch, *free_a, *free_b])
    mm = Value(m.fresh(node.outputs[0].name + "_mm"), TensorType(to.dtype, tuple(size[c] for c in prod)))
    nodes.append(Node("aten.matmul.default", [x, y], {}, [mm], None, node.layer))
    res = _permute(m, mm, prod, list(out), size, mm.type, nodes)
    return Rewrite(nodes, {node.outputs[0]: res})


def _permute(m: Match, x: Value, have: str, want: list[str], size: dict, t: TensorType, nodes: list[Node]) -> Value:
    perm = [have.index(c) for c in want]
    if perm == list(range(len(perm))):
        return x
    out = Value(m.fresh(x.name + "_p"), TensorType(t.dtype, tuple(size[c] for c in want)))
    nodes.append(Node("aten.permute.default", [x, perm], {}, [out], None, m.node.layer))
    return out


RULES: list[Rule] = [(("aten.einsum.default",), _einsum)]
