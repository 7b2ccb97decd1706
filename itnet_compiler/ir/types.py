"""Value types of the IR and the symbolic size expressions they carry.

A tensor type is a dtype and a shape whose entries are sympy expressions (integers, or symbols that came from
``torch.export.Dim``). A scalar type is ``int``, ``float`` or ``bool``; an ``int`` may carry the expression it equals
(``int(s0)`` for the result of ``sym_size``). Size expressions are printed with sympy's ``str`` and read back by the
small parser below (no ``eval``, no ``sympify`` of text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sympy
import torch

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
    torch.complex64: "c64",
    torch.complex128: "c128",
}
DTYPES: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}

SymExpr = sympy.Expr


@dataclass(frozen=True)
class TensorType:
    dtype: torch.dtype
    shape: tuple[SymExpr, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{DTYPE_NAMES[self.dtype]}[{','.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class ScalarType:
    kind: str  # "int" | "float" | "bool"
    expr: SymExpr | None = None

    def __str__(self) -> str:
        return self.kind if self.expr is None else f"{self.kind}({self.expr})"


Type = TensorType | ScalarType


def sym(size: object) -> SymExpr:
    """A torch size entry (int or SymInt) as a sympy expression, torch's FloorDiv/Mod turned into sympy's own."""
    if isinstance(size, int):
        return sympy.Integer(size)
    if isinstance(size, torch.SymInt):
        return canonical_expr(size.node.expr)
    raise TypeError(f"not a size: {size!r}")


def canonical_expr(expr: sympy.Expr) -> sympy.Expr:
    """Rewrite torch's sympy helper functions into plain sympy so that printing and parsing agree."""
    repl = {}
    for sub in sympy.preorder_traversal(expr):
        name = type(sub).__name__
        if name == "FloorDiv":
            repl[sub] = sympy.floor(canonical_expr(sub.args[0]) / canonical_expr(sub.args[1]))
        elif name in ("PythonMod", "Mod") and name != "Mod":
            repl[sub] = sympy.Mod(*[canonical_expr(a) for a in sub.args])
        elif name == "CleanDiv":
            repl[sub] = canonical_expr(sub.args[0]) / canonical_expr(sub.args[1])
    return expr.xreplace(repl) if repl else expr


_FUNCS = {"floor": sympy.floor, "ceiling": sympy.ceiling, "Mod": sympy.Mod, "Max": sympy.Max, "Min": sympy.Min}
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(\*\*|[-+*/(),]))")


class _ExprParser:
    """Recursive descent over ``+ - * / **``, parentheses, integers, symbols and a few functions."""

    def __init__(self, text: str):
        self.toks: list[tuple[str, str]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise ValueError(f"bad size expression near {text[pos:]!r}")
            pos = m.end()
            kind = "int" if m.group(1) else "name" if m.group(2) else "op"
            self.toks.append((kind, m.group(m.lastindex)))
        self.i = 0

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        if self.i >= len(self.toks):
            raise ValueError("size expression ends early")
        self.i += 1
        return self.toks[self.i - 1]

    def parse(self) -> sympy.Expr:
        e = self.sum()
        if self.i != len(self.toks):
            raise ValueError(f"unexpected {self.peek()!r} in size expression")
        return e

    def sum(self) -> sympy.Expr:
        e = self.product()
        while self.peek() in ("+", "-"):
            op = self.take()[1]
            rhs = self.product()
            e = e + rhs if op == "+" else e - rhs
        return e

    def product(self) -> sympy.Expr:
        e = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()[1]
            rhs = self.unary()
            e = e * rhs if op == "*" else e / rhs
        return e

    def unary(self) -> sympy.Expr:
        if self.peek() == "-":
            self.take()
            return -self.unary()
        base = self.atom()
        if self.peek() == "**":
            self.take()
            return base ** self.unary()
        return base

    def atom(self) -> sympy.Expr:
        kind, tok = self.take()
        if kind == "int":
            return sympy.Integer(int(tok))
        if tok == "(":
            e = self.sum()
            self.expect(")")
            return e
        if kind != "name":
            raise ValueError(f"unexpected {tok!r} in size expression")
        if self.peek() != "(":
            return sympy.Symbol(tok, integer=True, positive=True)
        if tok not in _FUNCS:
            raise ValueError(f"unknown function {tok!r} in size expression")
        self.take()
        args = [self.sum()]
        while self.peek() == ",":
            self.take()
            args.append(self.sum())
        self.expect(")")
        return _FUNCS[tok](*args)

    def expect(self, tok: str) -> None:
        if self.take()[1] != tok:
            raise ValueError(f"expected {tok!r} in size expression")


def parse_expr(text: str) -> sympy.Expr:
    return _ExprParser(text).parse()


def make_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)


def free_symbols(t: Type) -> set[sympy.Symbol]:
    if isinstance(t, TensorType):
        out: set[sympy.Symbol] = set()
        for d in t.shape:
            out |= d.free_symbols
        return out
    return set(t.expr.free_symbols) if t.expr is not None else set()


def numel(t: TensorType) -> SymExpr:
    n = sympy.Integer(1)
    for d in t.shape:
        n = n * d
    return n
