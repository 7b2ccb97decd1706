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
# Bounds that no real size expression comes near and that keep hostile text cheap to reject: sizes are 64-bit, an
# expression is short and shallow, and a power has a small literal exponent.
MAX_EXPR_CHARS = 1000
MAX_EXPR_TOKENS = 200
MAX_EXPR_DEPTH = 16
MAX_EXPONENT = 64
SIZE_LIMIT = 2**63
_BAD = (sympy.zoo, sympy.oo, -sympy.oo, sympy.nan)


class _ExprParser:
    """Recursive descent over ``+ - * / **``, parentheses, integers, symbols and a few functions, bounded in length,
    depth and magnitude. Sums and products are built in one ``Add``/``Mul`` each, as sympy prints them, so that
    ``2*(n + s)*floor(n/2)`` reads back as printed (a two-factor product would distribute the 2)."""

    def __init__(self, text: str):
        text = text.strip()
        if len(text) > MAX_EXPR_CHARS:
            raise ValueError(f"size expression longer than {MAX_EXPR_CHARS} characters")
        self.toks: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise ValueError(f"bad size expression near {text[pos : pos + 20]!r}")
            pos = m.end()
            kind = "int" if m.group(1) else "name" if m.group(2) else "op"
            self.toks.append((kind, m.group(m.lastindex)))
        if len(self.toks) > MAX_EXPR_TOKENS:
            raise ValueError(f"size expression with more than {MAX_EXPR_TOKENS} tokens")
        self.i = 0
        self.depth = 0

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

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_EXPR_DEPTH:
            raise ValueError(f"size expression nested deeper than {MAX_EXPR_DEPTH}")

    def sum(self) -> sympy.Expr:
        terms = [self.product()]
        while self.peek() in ("+", "-"):
            op = self.take()[1]
            rhs = self.product()
            terms.append(rhs if op == "+" else -rhs)
        return _bounded(sympy.Add(*terms) if len(terms) > 1 else terms[0])

    def product(self) -> sympy.Expr:
        factors = self.signed()
        while self.peek() in ("*", "/"):
            op = self.take()[1]
            rhs = self.signed()
            if op == "/" and sympy.Mul(*rhs) == 0:
                raise ValueError("division by zero in size expression")
            factors += rhs if op == "*" else [1 / sympy.Mul(*rhs)]
        return _bounded(sympy.Mul(*factors) if len(factors) > 1 else factors[0])

    def signed(self) -> list[sympy.Expr]:
        """A factor with its leading minus signs as factors of -1: sympy prints ``Mul(-1, a + b, c)`` as
        ``-(a + b)*c``, and negating ``a + b`` on its own would distribute the sign."""
        signs: list[sympy.Expr] = []
        while self.peek() == "-":
            self.take()
            signs.append(sympy.Integer(-1))
            if len(signs) > MAX_EXPR_DEPTH:
                raise ValueError(f"size expression nested deeper than {MAX_EXPR_DEPTH}")
        return [*signs, self.unary()]

    def unary(self) -> sympy.Expr:
        if self.peek() == "-":
            return sympy.Mul(*self.signed())
        base = self.atom()
        if self.peek() != "**":
            return base
        self.take()
        self.nest()
        exp = self.unary()
        self.depth -= 1
        if not (exp.is_Integer and abs(int(exp)) <= MAX_EXPONENT):
            raise ValueError(f"a size exponent must be an integer in [-{MAX_EXPONENT}, {MAX_EXPONENT}], not {exp}")
        if base == 0 and exp < 0:
            raise ValueError("division by zero in size expression")
        if base.is_Integer and int(exp) > 0 and (abs(int(base)).bit_length() - 1) * int(exp) >= 64:
            raise ValueError(f"size {base}**{exp} is beyond 64 bits")
        return _bounded(base**exp)

    def atom(self) -> sympy.Expr:
        kind, tok = self.take()
        if kind == "int":
            if len(tok) > 19 or int(tok) >= SIZE_LIMIT:
                raise ValueError(f"size {tok[:24]} is beyond 64 bits")
            return sympy.Integer(int(tok))
        if tok == "(":
            self.nest()
            e = self.sum()
            self.expect(")")
            self.depth -= 1
            return e
        if kind != "name":
            raise ValueError(f"unexpected {tok!r} in size expression")
        if self.peek() != "(":
            return sympy.Symbol(tok, integer=True, positive=True)
        if tok not in _FUNCS:
            raise ValueError(f"unknown function {tok!r} in size expression")
        self.take()
        self.nest()
        args = [self.sum()]
        while self.peek() == ",":
            self.take()
            args.append(self.sum())
        self.expect(")")
        self.depth -= 1
        arity = (2, 2) if tok == "Mod" else (1, 1) if tok in ("floor", "ceiling") else (1, 16)
        if not arity[0] <= len(args) <= arity[1]:
            raise ValueError(f"{tok} takes {arity[0]} argument(s) in a size expression, not {len(args)}")
        if tok == "Mod" and args[1] == 0:
            raise ValueError("Mod by zero in size expression")
        return _bounded(_FUNCS[tok](*args))

    def expect(self, tok: str) -> None:
        if self.take()[1] != tok:
            raise ValueError(f"expected {tok!r} in size expression")


def _bounded(e: sympy.Expr) -> sympy.Expr:
    """``e`` if it is finite and every number in it fits in 64 bits."""
    if e.has(*_BAD):
        raise ValueError("size expression is infinite or undefined (a division by zero?)")
    for n in e.atoms(sympy.Rational):
        if abs(n.p) >= SIZE_LIMIT or n.q >= SIZE_LIMIT:
            raise ValueError("size expression holds a number beyond 64 bits")
    return e


def parse_expr(text: str) -> sympy.Expr:
    """Read a size expression as ``str`` of a sympy expression prints it; ValueError, never anything else, if the
    text is not one (or is out of bounds)."""
    try:
        return _ExprParser(text).parse()
    except ValueError:
        raise
    except (TypeError, ArithmeticError, RecursionError, AttributeError) as e:  # sympy on odd input
        raise ValueError(f"bad size expression ({type(e).__name__})") from None


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
