"""Score modifications recovered from eager code: the helper of ``recognize_attention`` for chains that are more than
scale + one mask.

Expects: the softmax input of a hand-written attention chain. Guarantees: either nothing (the chain stays generic),
or the exact description of the logits as ``dot_exp`` holds it — the product ``q·kᵀ``, a scale, a score expression
over named extras (``ir/score_mod.py``), one optional outermost mask — with q, k, v, mask and extras rewritten to the
[B, H, L, ·] layout the node takes.

Walked, from the softmax input down to ``matmul|bmm(q, kᵀ)`` or ``baddbmm(bias, q, kᵀ, beta=1, alpha=a)``: scales
(``mul|div`` by a number or by a tensor), ``add|sub`` of numbers and tensors (in place or not, any number of them: each
tensor becomes an extra, which may itself depend on q or k — DeBERTa's disentangled terms), ``tanh`` (softcapping),
``masked_fill``/``where`` with any constant (``finfo.min`` included), same-dtype copies, and views that change only
the leading (batch, head, window) dims, between 3-d, 4-d and 5-d layouts. The leading dims of the softmax's input say
how the node's [B, H] is laid out: rank 3 is one head per batch entry, rank 4 is [B, H], rank 5 and up merge every
leading dim but the one before the rows into B (Swin's windows, LongT5's blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy
import torch

from ..ir import score_mod as sm
from ..ir.core import Node, Value
from ..ir.fields import MAX_STR_ATTR
from ..ir.types import TensorType
from .rewrite import Match, bind

_MATMUL = ("aten.matmul.default", "aten.bmm.default")
_VIEW = ("aten.reshape.default", "aten.view.default", "aten._unsafe_view.default")
_COPY = ("aten.clone.default", "aten.contiguous.default", "aten.alias.default")
_CAST = ("aten.to.dtype", "aten._to_copy.default", "aten.type_as.default")
_ADD = ("aten.add.Tensor", "aten.add_.Tensor", "aten.add.Scalar")
_SUB = ("aten.sub.Tensor", "aten.sub_.Tensor", "aten.sub.Scalar", "aten.rsub.Scalar", "aten.rsub.Tensor")
_MUL = ("aten.mul.Tensor", "aten.mul_.Tensor", "aten.mul.Scalar")
_DIV = ("aten.div.Tensor", "aten.div_.Tensor", "aten.div.Scalar")
_FILL = ("aten.masked_fill.Scalar", "aten.masked_fill_.Scalar", "aten.masked_fill.Tensor", "aten.masked_fill_.Tensor")
_ROWMAX = ("aten.amax.default", "aten.max.dim")
MAX_OPS = 64


def tt(v: object) -> TensorType | None:
    return v.type if isinstance(v, Value) and isinstance(v.type, TensorType) else None


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class Scores:
    """What the walk found: the product's operands, the logits as an expression of the raw product ``s``, and
    each extra with the shape of the scores where it entered."""

    q: Value | None = None
    kT: Value | None = None
    raw: Value | None = None  # the product q·kᵀ (its shape is the matmul layout)
    extras: list[tuple[Value, tuple[sympy.Expr, ...]]] = field(default_factory=list)
    steps: int = 0

    def extra(self, v: Value, layout: tuple[sympy.Expr, ...]) -> sm.Expr:
        for n, (u, _) in enumerate(self.extras):
            if u is v:
                return sm.var(f"t{n}")
        self.extras.append((v, layout))
        return sm.var(f"t{len(self.extras) - 1}")


def _leading_view(n: Node) -> bool:
    """A view/reshape that keeps the last two dims and regroups only the leading ones."""
    src, out = tt(n.args[0]), tt(n.outputs[0])
    if src is None or out is None or src.rank < 3 or out.rank < 3 or src.shape[-2:] != out.shape[-2:]:
        return False
    return sympy.simplify(sympy.Mul(*src.shape[:-2]) - sympy.Mul(*out.shape[:-2])) == 0


def walk(m: Match, v: Value, root: bool = True, sc: Scores | None = None) -> tuple[sm.Expr, Scores] | None:
    """The logits ``v`` as an expression of the raw product, or None."""
    sc = sc or Scores()
    sc.steps += 1
    n = m.producer(v)
    if n is None or sc.steps > MAX_OPS or tt(v) is None or (not root and m.n_uses(v) != 1):
        return None
    out = tt(n.outputs[0])
    if n.op in _MATMUL:
        sc.q, sc.kT, sc.raw = n.args[0], n.args[1], v
        return sm.S, sc
    if n.op == "aten.baddbmm.default":
        a = bind(n)
        if a.get("beta", 1) != 1 or not _number(a.get("alpha", 1)) or tt(a["self"]) is None:
            return None
        sc.q, sc.kT, sc.raw = a["batch1"], a["batch2"], v
        scaled = sm.mul(sm.S, sm.num(a.get("alpha", 1)))
        return sm.add(scaled, sc.extra(a["self"], out.shape)), sc
    if n.op in _VIEW or n.op in _COPY or n.op in _CAST:
        src = tt(n.args[0])
        if src is None or src.dtype != out.dtype or (n.op in _VIEW and not _leading_view(n)):
            return None
        return walk(m, n.args[0], False, sc)
    if n.op == "aten.tanh.default":
        got = walk(m, n.args[0], False, sc)
        return (sm.Expr("tanh", (got[0],)), sc) if got else None
    if n.op in _FILL or n.op.startswith("aten.where."):
        return _fill(m, n, sc)
    if n.op in _SUB and _minus_row_max(m, n):
        return walk(m, n.args[0], root, sc)  # softmax(x - max_j x) = softmax(x): a shift per row
    if n.op in _ADD + _SUB + _MUL + _DIV:
        return _binary(m, n, sc)
    return None


def _minus_row_max(m: Match, n: Node) -> bool:
    """``x - amax(x, -1, keepdim)`` (or ``max.dim``'s values), ``x`` itself a walkable score: the stabilising shift
    eager code writes before a softmax, which the node's normalisation already does. Only where the result feeds
    the softmax directly (the walk's root and what it reaches through shifts), where a per-row shift is exact."""
    x, y = n.args[0], n.args[1]
    if len(n.args) > 2 or n.kwargs.get("alpha", 1) != 1 or tt(y) is None or tt(x) is None:
        return False
    p = m.producer(y)
    if p is not None and p.op == "aten.detach.default":
        p = m.producer(p.args[0])
    if p is not None and p.op == "operator.getitem" and p.args[1] == 0:
        p = m.producer(p.args[0])
    if p is None or p.op not in _ROWMAX or p.args[0] is not x:
        return False
    dims = p.args[1] if len(p.args) > 1 else None
    keep = p.args[2] if len(p.args) > 2 else p.kwargs.get("keepdim", False)
    return dims in (-1, [-1], tt(x).rank - 1, [tt(x).rank - 1]) and keep is True


def _binary(m: Match, n: Node, sc: Scores) -> tuple[sm.Expr, Scores] | None:
    a = bind(n)
    x, y = a.get("self"), a.get("other")
    alpha = a.get("alpha", 1)
    if not _number(alpha):
        return None
    out = tt(n.outputs[0])
    rsub = n.op.startswith("aten.rsub")
    for path, other, swapped in ((x, y, False), (y, x, True)):
        if tt(path) is None or tt(path).shape != out.shape or tt(path).dtype != out.dtype:
            continue
        ot = tt(other)
        if ot is not None and (ot.dtype == torch.bool or ot.rank > out.rank):
            continue
        mark = len(sc.extras)
        got = walk(m, path, False, sc)
        if got is None:
            del sc.extras[mark:]
            continue
        e = got[0]
        o = sm.num(other) if _number(other) else sc.extra(other, out.shape) if ot is not None else None
        if o is None:
            return None
        return _combine(n.op, e, o, alpha, swapped ^ rsub), sc
    return None


def _combine(op: str, e: sm.Expr, o: sm.Expr, alpha: float, swapped: bool) -> sm.Expr | None:
    """``op(e, o)`` (``op(o, e)`` when swapped) with torch's alpha on the second operand of add/sub."""
    name = op.split(".")[1].rstrip("_")
    if name in ("mul", "div") and alpha != 1:
        return None
    if name == "mul":
        return sm.mul(e, o)
    if name == "div":
        return sm.Expr("div", (o, e) if swapped else (e, o))
    first, second = (o, e) if swapped else (e, o)
    second = sm.mul(second, sm.num(alpha)) if alpha != 1 else second
    return sm.add(first, second) if name == "add" else sm.Expr("sub", (first, second))


def _fill(m: Match, n: Node, sc: Scores) -> tuple[sm.Expr, Scores] | None:
    """masked_fill(s, c, x) = where(c, x, s); where(c, s, x); where(c, x, s); x a number or a tensor."""
    out = tt(n.outputs[0])
    if n.op in _FILL:
        cond, fill, base, base_first = n.args[1], n.args[2], n.args[0], False
    elif n.op == "aten.where.ScalarOther":
        cond, base, fill, base_first = n.args[0], n.args[1], n.args[2], True
    elif n.op == "aten.where.ScalarSelf":
        cond, fill, base, base_first = n.args[0], n.args[1], n.args[2], False
    elif n.op == "aten.where.self":  # where(c, a, b): the scores may be either branch
        cond, base, fill, base_first = n.args[0], n.args[1], n.args[2], True
        if m.producer(base) is None or _tensor_fill_first(m, n, sc):
            base, fill, base_first = fill, base, False
    else:
        return None
    ct = tt(cond)
    if ct is None or ct.dtype != torch.bool or tt(base) is None or tt(base).shape != out.shape:
        return None
    got = walk(m, base, False, sc)
    if got is None:
        return None
    const = _constant_scalar(m, fill)
    if _number(fill) or const is not None:
        f = sm.num(fill if const is None else const)
    elif tt(fill) is not None and tt(fill).dtype != torch.bool:
        f = sc.extra(fill, out.shape)
    else:
        return None
    c = sc.extra(cond, out.shape)
    return sm.Expr("where", (c, got[0], f) if base_first else (c, f, got[0])), sc


def _tensor_fill_first(m: Match, n: Node, sc: Scores) -> bool:
    """Whether the scores of ``where(c, a, b)`` are ``b``: ``a`` does not lead down to a product, ``b`` does."""
    probe = Scores(steps=sc.steps)
    if walk(m, n.args[1], False, probe) is not None:
        return False
    return walk(m, n.args[2], False, Scores(steps=sc.steps)) is not None


_COPIES = ("aten.detach.default", "aten.detach_.default", "aten.lift_fresh_copy.default", "aten.clone.default",
           "aten.alias.default")  # fmt: skip


def _constant_scalar(m: Match, v: object) -> float | None:
    """The value of a 0-d tensor that is a program constant seen through copies (``torch.tensor(finfo.min)`` as a
    masked_fill value exports as ``detach_(lift_fresh_copy(c))``); None otherwise."""
    t = tt(v)
    if t is None or t.rank != 0:
        return None
    while (p := m.producer(v)) is not None and p.op in _COPIES:
        v = p.args[0]
    weight = next((w for w in m.prog.weights if w.value is v), None)
    if weight is None or weight.kind != "const" or weight.key not in m.prog.tensors:
        return None
    value = m.prog.tensors[weight.key]
    return float(value) if value.numel() == 1 and value.is_floating_point() else None


# ------------------------------------------------------------------------------------------------ normal form
@dataclass
class Logits:
    """The chain in the node's terms: kernel exp(m(scale·raw) + mask)."""

    scale: float
    expr: sm.Expr
    extras: list[tuple[Value, tuple[sympy.Expr, ...]]]
    mask: tuple[Value, tuple[sympy.Expr, ...]] | None = None
    drop: bool = False  # the mask holds True where a pair is dropped


def normal_form(e: sm.Expr, sc: Scores) -> Logits | None:
    """Peel the outermost mask (an additive tensor or a -inf fill, what fold_masks and the kernels' tile skipping
    read), pull a common scale of ``s`` into ``scale``, renumber the extras, and check every constant is finite."""
    extras = list(sc.extras)
    mask, drop = None, False
    side = next((k for k in (1, 0) if e.op == "add" and _is_extra(e.args[k])), None)
    if side is not None and tt(_ref(e.args[side], extras)[0]).dtype != torch.bool:
        mask, e = _ref(e.args[side], extras), e.args[1 - side]
    elif e.op == "where" and _neg_inf(e.args[1]) or e.op == "where" and _neg_inf(e.args[2]):
        drop = _neg_inf(e.args[1])
        mask, e = _ref(e.args[0], extras), e.args[2] if drop else e.args[1]
    if "s" not in sm.variables(e):
        return None
    scale, e = _pull_scale(e)
    used = sorted(sm.extras(e))
    renumber = {f"t{old}": f"t{new}" for new, old in enumerate(used)}
    e = sm.rename(e, renumber)
    if not _finite(e) or len(used) > sm.MAX_EXTRAS:
        return None
    return Logits(scale, e, [extras[i] for i in used], mask, drop)


def as_drop_mask(form: Logits, cond: Value) -> Logits | None:
    """``where(c, v, x)`` at the root with v ≤ -1e30 (``finfo.min``) and the weights zeroed where c after the
    softmax: the node's boolean drop mask c over x (fully masked rows are 0 either way, others see exp(v - max) = 0)."""
    e = form.expr
    if form.mask is not None or e.op != "where" or e.args[1].op != "num" or e.args[1].value > -1e30:
        return None
    n = int(e.args[0].name[1:])
    if form.extras[n][0] is not cond or n in sm.extras(e.args[2]):
        return None
    keep = [i for i in range(len(form.extras)) if i != n]
    names = {f"t{old}": f"t{new}" for new, old in enumerate(keep)}
    return Logits(form.scale, sm.rename(e.args[2], names), [form.extras[i] for i in keep], form.extras[n], True)


def _is_extra(e: sm.Expr) -> bool:
    return e.op == "var" and e.name.startswith("t")


def _ref(e: sm.Expr, extras: list) -> tuple[Value, tuple[sympy.Expr, ...]]:
    return extras[int(e.name[1:])]


def _neg_inf(e: sm.Expr) -> bool:
    return e.op == "num" and e.value == float("-inf")


def _finite(e: sm.Expr) -> bool:
    """No NaN and no +inf constant (a -inf fill inside the expression is kept: the kernels take it)."""
    return (e.op != "num" or not (math.isnan(e.value) or e.value == math.inf)) and all(map(_finite, e.args))


def _pull_scale(e: sm.Expr) -> tuple[float, sm.Expr]:
    """If every ``s`` appears as ``s * c`` (or ``s / c``) with one c > 0, scale = c and those become ``s``."""
    found: set[float] = set()

    def seen(x: sm.Expr) -> None:
        if x.op in ("mul", "div") and x.args[0] == sm.S and x.args[1].op == "num":
            c = x.args[1].value
            found.add(c if x.op == "mul" else 1.0 / c if c else math.inf)
            return
        if x == sm.S:
            found.add(1.0)
            return
        for a in x.args:
            seen(a)

    seen(e)
    if len(found) != 1:
        return 1.0, e
    c = found.pop()
    if not (math.isfinite(c) and c > 0):
        return 1.0, e

    def strip(x: sm.Expr) -> sm.Expr:
        if x.op in ("mul", "div") and x.args[0] == sm.S and x.args[1].op == "num":
            return sm.S
        return sm.Expr(x.op, tuple(strip(a) for a in x.args), x.value, x.name) if x.args else x

    return c, strip(e)


def expression_text(e: sm.Expr) -> str | None:
    """The attribute text, or None when the expression is the plain score or too long for an attribute."""
    if e == sm.S:
        return ""
    t = sm.text(e)
    return t if len(t) <= MAX_STR_ATTR else None


# ---------------------------------------------------------------------------------------------------- layouts
class Layout:
    """Conversions into the node's [B, H, L, ·] layout from any layout whose leading dims regroup B·H."""

    def __init__(self, m: Match, heads: int, batch: sympy.Expr, layer: str):
        self.m, self.h, self.nb, self.layer = m, sympy.Integer(heads), batch, layer
        self.pre: list[Node] = []

    def _op(self, op: str, args: list[object], shape: tuple, dtype: torch.dtype, hint: str) -> Value:
        out = Value(self.m.fresh(hint), TensorType(dtype, tuple(sympy.sympify(d) for d in shape)))
        self.pre.append(Node(op, args, {}, [out], None, self.layer))
        return out

    def operand(self, x: Value) -> Value | None:
        """q, k or v: leading dims that flatten to B·H in the scores' order (no broadcasting)."""
        t = tt(x)
        lead = t.shape[:-2]
        if sympy.simplify(sympy.Mul(*lead) - self.nb * self.h) != 0:
            return None
        return self._regroup(x, t, lead)

    def broadcast(self, x: Value, layout: tuple[sympy.Expr, ...]) -> Value | None:
        """An extra or a mask that broadcasts to the scores' shape ``layout`` there: rank-4 broadcastable result."""
        t = tt(x)
        if t is None or t.rank > len(layout):
            return None
        while t.rank < len(layout):
            x = self._op("aten.unsqueeze.default", [x, 0], (1, *t.shape), t.dtype, x.name + "_u")
            t = tt(x)
        lead = layout[:-2]
        mine = t.shape[:-2]
        if all(d == 1 for d in mine):
            return self._ones(x, t, len(lead))
        if tuple(lead) == (self.nb, self.h):
            return x
        heads_last = len(lead) >= 2 and lead[-1] == self.h  # [..., H, Lq, Lk]: keep the head dim as it is
        group = lead[:-1] if heads_last else lead
        if any(not d.is_Integer for d, own in zip(group, mine, strict=False) if own != d):
            return None  # expanding a symbolic dim would need its size as a value
        if tuple(mine[: len(group)]) != tuple(group) and not (heads_last and all(d == 1 for d in mine[:-1])):
            sizes = [int(d) if own != d else -1 for d, own in zip(group, mine, strict=False)]
            sizes += [-1] * (t.rank - len(sizes))
            shape = (*group, *t.shape[len(group) :])
            x = self._op("aten.expand.default", [x, sizes], shape, t.dtype, x.name + "_e")
            t = tt(x)
        if heads_last:
            rows = 1 if all(d == 1 for d in t.shape[: len(group)]) else self.nb
            return self._op("aten.flatten.using_ints", [x, 0, len(lead) - 2], (rows, *t.shape[len(group) :]),
                            t.dtype, x.name + "_f")  # fmt: skip
        return self._regroup(x, t, tuple(lead))

    def _ones(self, x: Value, t: TensorType, n_lead: int) -> Value:
        tail = t.shape[-2:]
        if n_lead == 1:
            return self._op("aten.unsqueeze.default", [x, 0], (1, 1, *tail), t.dtype, x.name + "_u")
        if n_lead == 2:
            return x
        return self._op("aten.flatten.using_ints", [x, 0, n_lead - 2], (1, 1, *tail), t.dtype, x.name + "_f")

    def _regroup(self, x: Value, t: TensorType, lead: tuple) -> Value:
        """Leading dims ``lead`` (flattening to B·H) regrouped as [B, H]."""
        tail = t.shape[len(lead) :]
        if tuple(lead) == (self.nb, self.h):
            return x
        if len(lead) > 1:
            x = self._op("aten.flatten.using_ints", [x, 0, len(lead) - 1], (self.nb * self.h, *tail), t.dtype,
                         x.name + "_f")  # fmt: skip
        return self._op("aten.unflatten.int", [x, 0, [-1, int(self.h)]], (self.nb, self.h, *tail), t.dtype,
                        x.name + "_bh")  # fmt: skip

    def back(self, y: Value, want: TensorType, hint: str) -> tuple[list[Node], Value | None]:
        """The node's [B, H, L, D] result in the layout of the value it replaces (None: not expressible)."""
        lead = want.shape[:-2]
        if tuple(lead) == (self.nb, self.h):
            return [], y
        nodes_before = len(self.pre)
        t = tt(y)
        flat = self._op("aten.flatten.using_ints", [y, 0, 1], (self.nb * self.h, *t.shape[2:]), t.dtype, hint + "_f")
        if len(lead) == 1:
            out = flat
        elif not all(d.is_Integer for d in lead[1:]):
            del self.pre[nodes_before:]
            return [], None
        else:
            sizes = [-1] + [int(d) for d in lead[1:]]
            out = self._op("aten.unflatten.int", [flat, 0, sizes], want.shape, want.dtype, hint)
        nodes = self.pre[nodes_before:]
        del self.pre[nodes_before:]
        return nodes, out
