"""Score modifications of ``dot_exp``: the small typed expression m between the scaled product and the softmax.

K(i, j) = exp(m(s, b, h, i, j, t0, t1, ...)) with s = scale·⟨q_i, k_j⟩, then the node's mask as before. This is
what FlexAttention asks its users to write as ``score_mod``; itnet recovers it from eager code (ALiBi biases, relative
position tables, DeBERTa's disentangled terms, ``finfo.min`` fills, ``tanh`` softcapping, a scale after a bias).

Grammar (the attribute's text; printed and parsed with the node)::

    expr  := term (('+' | '-') term)*
    term  := unary (('*' | '/') unary)*
    unary := '-' unary | atom
    atom  := NUMBER | 'inf' | 's' | 'b' | 'h' | 'i' | 'j' | 't'DIGIT | 'tanh(' expr ')' | 'exp(' expr ')'
           | 'where(' 't'DIGIT ',' expr ',' expr ')' | '(' expr ')'

``inf`` appears only negated (``-inf``: a fill that removes a pair). ``tK`` is the node's K-th ``extras`` input,
read at (b, h, i, j) through broadcasting (each is broadcastable to
[B, H, L_q, L_k]); in ``where(tK, a, b)`` it is a boolean input (a where true). ``b``, ``h``, ``i``, ``j`` are the
batch, head, row and column indices. Numbers are finite decimals (``-3.4028234663852886e+38`` is ``finfo(f32).min``).

Everything a backend needs is here: ``parse`` (bounded: length, depth), ``text`` (canonical form), ``derivative``
(symbolic, for the kernels' backward), ``evaluate`` (torch, for the torch lowerings) and ``ops`` (a cost count).
Expressions are data: nothing is ever evaluated as Python.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MAX_EXTRAS = 4
MAX_DEPTH = 32
INDEX_VARS = ("b", "h", "i", "j")
FUNCS = ("tanh", "exp", "where")
_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|(?P<name>[a-z]+\d*)|(?P<op>[-+*/(),]))"
)


@dataclass(frozen=True)
class Expr:
    """One node of the expression: ``op`` is num, var, neg, add, sub, mul, div, tanh, exp or where."""

    op: str
    args: tuple[Expr, ...] = ()
    value: float = 0.0
    name: str = ""

    def __str__(self) -> str:
        return text(self)


def num(x: float) -> Expr:
    return Expr("num", value=float(x))


def var(name: str) -> Expr:
    return Expr("var", name=name)


S = var("s")


# ------------------------------------------------------------------------------------------------------- parsing
class _Parser:
    def __init__(self, src: str):
        self.toks: list[tuple[str, str]] = []
        pos = 0
        src = src.rstrip()
        while pos < len(src):
            m = _TOKEN.match(src, pos)
            if m is None or m.end() == pos:
                at = len(src) - len(src[pos:].lstrip())
                raise ValueError(f"unexpected character {src[at : at + 1]!r} in score expression at {at}")
            kind = m.lastgroup or "op"
            self.toks.append((kind, m.group(kind)))
            pos = m.end()
        self.pos = 0

    def peek(self) -> str | None:
        return self.toks[self.pos][1] if self.pos < len(self.toks) else None

    def take(self, want: str | None = None) -> tuple[str, str]:
        if self.pos >= len(self.toks):
            raise ValueError("score expression ends early")
        tok = self.toks[self.pos]
        if want is not None and tok[1] != want:
            raise ValueError(f"expected {want!r} in score expression, not {tok[1]!r}")
        self.pos += 1
        return tok

    def expr(self, depth: int) -> Expr:
        if depth > MAX_DEPTH:
            raise ValueError(f"score expression nested deeper than {MAX_DEPTH}")
        e = self.term(depth + 1)
        while self.peek() in ("+", "-"):
            op = "add" if self.take()[1] == "+" else "sub"
            e = Expr(op, (e, self.term(depth + 1)))
        return e

    def term(self, depth: int) -> Expr:
        e = self.unary(depth + 1)
        while self.peek() in ("*", "/"):
            op = "mul" if self.take()[1] == "*" else "div"
            e = Expr(op, (e, self.unary(depth + 1)))
        return e

    def unary(self, depth: int) -> Expr:
        if depth > MAX_DEPTH:
            raise ValueError(f"score expression nested deeper than {MAX_DEPTH}")
        if self.peek() == "-":
            self.take()
            if self.pos < len(self.toks) and (self.toks[self.pos][0] == "num" or self.toks[self.pos][1] == "inf"):
                return num(-self.atom(depth + 1).value)  # a negative constant, as ``text`` writes it
            return Expr("neg", (self.unary(depth + 1),))
        return self.atom(depth + 1)

    def atom(self, depth: int) -> Expr:
        kind, tok = self.take()
        if kind == "num":
            val = float(tok)
            if not math.isfinite(val):
                raise ValueError(f"score expression constant {tok} is not finite")
            return num(val)
        if tok == "inf":  # only as -inf, a fill that removes a pair (checked by ``check``)
            return num(math.inf)
        if tok == "(":
            e = self.expr(depth + 1)
            self.take(")")
            return e
        if kind != "name":
            raise ValueError(f"unexpected {tok!r} in score expression")
        if tok in FUNCS:
            self.take("(")
            args = [self.expr(depth + 1)]
            while self.peek() == ",":
                self.take()
                args.append(self.expr(depth + 1))
            self.take(")")
            return _call(tok, args)
        if tok == "s" or tok in INDEX_VARS or _extra_index(tok) is not None:
            return var(tok)
        raise ValueError(f"unknown name {tok!r} in score expression (s, b, h, i, j, t0..t{MAX_EXTRAS - 1})")


def _call(fn: str, args: list[Expr]) -> Expr:
    want = 3 if fn == "where" else 1
    if len(args) != want:
        raise ValueError(f"{fn} takes {want} argument{'s' if want > 1 else ''}, not {len(args)}")
    if fn == "where" and (args[0].op != "var" or _extra_index(args[0].name) is None):
        raise ValueError("where(c, a, b) needs a boolean input t0..t3 as its condition")
    return Expr(fn, tuple(args))


def _extra_index(name: str) -> int | None:
    m = re.fullmatch(r"t(\d)", name)
    return int(m.group(1)) if m and int(m.group(1)) < MAX_EXTRAS else None


def parse(src: str) -> Expr:
    """The expression of ``src``; ValueError with the reason otherwise."""
    if not isinstance(src, str) or not src.strip():
        raise ValueError("a score expression is non-empty text")
    p = _Parser(src)
    e = p.expr(0)
    if p.peek() is not None:
        raise ValueError(f"unexpected {p.peek()!r} after the score expression")
    if _has_inf(e):
        raise ValueError("the score expression may hold -inf (a removed pair) but not +inf")
    return e


# ----------------------------------------------------------------------------------------------------- printing
_PREC = {"add": 1, "sub": 1, "mul": 2, "div": 2, "neg": 3}
_SYM = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def text(e: Expr) -> str:
    """Canonical text: parse(text(e)) == e."""
    if e.op == "num":
        return repr(e.value) if e.value >= 0 else f"({e.value!r})"
    if e.op == "var":
        return e.name
    if e.op == "neg":
        return "-" + _wrap(e.args[0], 3)
    if e.op in _SYM:
        p = _PREC[e.op]
        return f"{_wrap(e.args[0], p)} {_SYM[e.op]} {_wrap(e.args[1], p + 1)}"
    return f"{e.op}({', '.join(text(a) for a in e.args)})"


def _wrap(e: Expr, prec: int) -> str:
    t = text(e)
    return f"({t})" if _PREC.get(e.op, 9) < prec else t


# ---------------------------------------------------------------------------------------------------- structure
def variables(e: Expr) -> set[str]:
    if e.op == "var":
        return {e.name}
    return set().union(*(variables(a) for a in e.args)) if e.args else set()


def conditions(e: Expr) -> set[int]:
    """The extras read as booleans (the condition of a ``where``)."""
    out = {_extra_index(e.args[0].name)} if e.op == "where" else set()
    for a in e.args[1:] if e.op == "where" else e.args:
        out |= conditions(a)
    return out  # type: ignore[return-value]


def extras(e: Expr) -> set[int]:
    return {i for i in map(_extra_index, variables(e)) if i is not None}


def rename(e: Expr, names: dict[str, str]) -> Expr:
    """``e`` with its variables renamed by ``names`` (``{"t2": "t0"}`` when extras are dropped or reordered)."""
    if e.op == "var":
        return var(names.get(e.name, e.name))
    return Expr(e.op, tuple(rename(a, names) for a in e.args), e.value, e.name) if e.args else e


def ops(e: Expr) -> int:
    """Arithmetic operations per (i, j) pair (tanh and exp count 4): the cost rules' per-pair term."""
    own = {"num": 0, "var": 0, "tanh": 4, "exp": 4}.get(e.op, 1)
    return own + sum(ops(a) for a in e.args)


def _has_inf(e: Expr) -> bool:
    return (e.op == "num" and e.value == math.inf) or any(map(_has_inf, e.args))


def check(e: Expr, n_extras: int) -> None:
    """Every tK refers to one of the node's ``n_extras`` inputs, and ``s`` is read."""
    used = extras(e)
    if used and max(used) >= n_extras:
        raise ValueError(f"the score expression reads t{max(used)} but the node has {n_extras} extras input(s)")
    if "s" not in variables(e):
        raise ValueError("the score expression must read the score s")


# ------------------------------------------------------------------------------------------------- simplifying
def _is(e: Expr, v: float) -> bool:
    return e.op == "num" and e.value == v


def add(a: Expr, b: Expr) -> Expr:
    if _is(a, 0):
        return b
    if _is(b, 0):
        return a
    return Expr("add", (a, b))


def mul(a: Expr, b: Expr) -> Expr:
    if _is(a, 0) or _is(b, 0):
        return num(0)
    if _is(a, 1):
        return b
    if _is(b, 1):
        return a
    return Expr("mul", (a, b))


def derivative(e: Expr, x: str) -> Expr:
    """∂e/∂x, symbolically (x a variable name), with trivial terms folded."""
    op, a = e.op, e.args
    if op == "num":
        return num(0)
    if op == "var":
        return num(1.0 if e.name == x else 0.0)
    if op == "neg":
        d = derivative(a[0], x)
        return d if _is(d, 0) else Expr("neg", (d,))
    if op in ("add", "sub"):
        da, db = derivative(a[0], x), derivative(a[1], x)
        if op == "add":
            return add(da, db)
        return da if _is(db, 0) else Expr("sub", (da, db))
    if op == "mul":
        return add(mul(derivative(a[0], x), a[1]), mul(a[0], derivative(a[1], x)))
    if op == "div":
        da, db = derivative(a[0], x), derivative(a[1], x)
        first = da if _is(da, 0) else Expr("div", (da, a[1]))
        if _is(db, 0):
            return first
        second = Expr("div", (mul(a[0], db), Expr("mul", (a[1], a[1]))))
        return Expr("sub", (first, second)) if not _is(first, 0) else Expr("neg", (second,))
    if op == "tanh":  # 1 - tanh²
        t = Expr("tanh", (a[0],))
        return mul(Expr("sub", (num(1), Expr("mul", (t, t)))), derivative(a[0], x))
    if op == "exp":
        return mul(e, derivative(a[0], x))
    # where(c, a, b): the condition is a boolean input, never differentiated
    da, db = derivative(a[1], x), derivative(a[2], x)
    return num(0) if _is(da, 0) and _is(db, 0) else Expr("where", (a[0], da, db))


# ------------------------------------------------------------------------------------------------- evaluating
def evaluate(e: Expr, env: dict[str, object]):
    """e over torch tensors (or numbers): ``env`` maps s, b, h, i, j and tK to values that broadcast together."""
    import torch

    op = e.op
    if op == "num":
        return e.value
    if op == "var":
        return env[e.name]
    vals = [evaluate(a, env) for a in e.args[1:]] if op == "where" else [evaluate(a, env) for a in e.args]
    if op == "neg":
        return -vals[0]
    if op == "add":
        return vals[0] + vals[1]
    if op == "sub":
        return vals[0] - vals[1]
    if op == "mul":
        return vals[0] * vals[1]
    if op == "div":
        return vals[0] / vals[1]
    if op == "tanh":
        return torch.tanh(torch.as_tensor(vals[0]))
    if op == "exp":
        return torch.exp(torch.as_tensor(vals[0]))
    cond = env[e.args[0].name]
    a, b = (v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=env["s"].dtype) for v in vals)
    return torch.where(cond, a, b)
