"""Reads the text form written by ``printer.py`` (its docstring is the grammar) back into a Program.

Errors carry the line and column of the offending character. Nothing is evaluated: literals, JSON strings and size
expressions each have their own small reader. The text may come from anyone (a bundle someone sent), so reading is
bounded: text and line length, list and JSON nesting, integer literals (64 bits) and size expressions (see
``types.parse_expr``) all have limits, and every way the text can be wrong is one ``ParseError``.
"""

from __future__ import annotations

import json
import keyword
import re

import torch

from ..errors import ParseError
from .core import Node, Program, Value, Weight
from .families import FAMILIES
from .types import DTYPES, SIZE_LIMIT, ScalarType, TensorType, Type, parse_expr

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OP = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_VALUE = re.compile(r"%([A-Za-z0-9_.]+)")
_NUMBER = re.compile(r"-?(inf|nan|\d+(\.\d*)?([eE][-+]?\d+)?)")
_JSON = json.JSONDecoder()
_KWARG = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=")
_INT = re.compile(r"-?\d+")

MAX_TEXT = 1 << 30  # characters of a whole program
MAX_LINE = 1 << 22  # characters of one line (a signature of a large model is some kilobytes)
MAX_NESTING = 32  # nested lists in an argument, containers in a JSON signature
MAX_RANK = 64  # torch's own limit on tensor dimensions


def valid_name(name: str) -> bool:
    """An SSA name the generated Python can hold as a variable: an identifier that is not a keyword."""
    return name.isidentifier() and not keyword.iskeyword(name)


def json_depth(text: str, start: int, limit: int) -> int | None:
    """Position where the JSON value at ``start`` nests deeper than ``limit``, or None; strings are skipped."""
    depth, i, n = 0, start, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c in "[{":
            depth += 1
            if depth > limit:
                return i
        elif c in "]}":
            depth -= 1
            if depth <= 0:
                return None
        i += 1
    return None


class _Line:
    """A cursor over one line of text."""

    def __init__(self, text: str, lineno: int):
        self.text = text
        self.lineno = lineno
        self.pos = 0

    def error(self, msg: str, pos: int | None = None) -> ParseError:
        return ParseError(msg, self.lineno, (self.pos if pos is None else pos) + 1)

    def ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def peek(self, s: str) -> bool:
        self.ws()
        return self.text.startswith(s, self.pos)

    def eat(self, s: str) -> bool:
        if self.peek(s):
            self.pos += len(s)
            return True
        return False

    def expect(self, s: str) -> None:
        if not self.eat(s):
            found = self.text[self.pos : self.pos + 12] or "end of line"
            raise self.error(f"expected {s!r}, found {found!r}")

    def match(self, pat: re.Pattern[str], what: str) -> re.Match[str]:
        self.ws()
        m = pat.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected {what}")
        self.pos = m.end()
        return m

    def string(self) -> str:
        self.ws()
        if not self.peek('"'):
            raise self.error("expected a string")
        try:
            val, end = _JSON.raw_decode(self.text, self.pos)
        except json.JSONDecodeError as e:
            raise self.error(f"bad string: {e.msg}") from None
        self.pos = end
        return val

    def json(self) -> object:
        self.ws()
        deep = json_depth(self.text, self.pos, MAX_NESTING)
        if deep is not None:
            raise self.error(f"JSON nested deeper than {MAX_NESTING} levels", deep)
        try:
            val, end = _JSON.raw_decode(self.text, self.pos)
        except json.JSONDecodeError as e:
            raise self.error(f"bad JSON: {e.msg}", self.pos + e.pos - self.pos) from None
        self.pos = end
        return val

    def end(self) -> None:
        self.ws()
        if self.pos != len(self.text):
            raise self.error(f"unexpected {self.text[self.pos : self.pos + 12]!r}")


class _Parser:
    def __init__(self) -> None:
        self.prog = Program()
        self.env: dict[str, Value] = {}

    def define(self, ln: _Line, name: str, t: Type, pos: int) -> Value:
        if not valid_name(name):
            raise ln.error(f"%{name} is not a valid value name (an identifier that is not a Python keyword)", pos)
        if name in self.env:
            raise ln.error(f"%{name} is defined twice", pos)
        v = Value(name, t)
        self.env[name] = v
        return v

    def value(self, ln: _Line) -> Value:
        ln.ws()
        start = ln.pos
        m = ln.match(_VALUE, "a value")
        v = self.env.get(m.group(1))
        if v is None:
            raise ln.error(f"%{m.group(1)} is used before it is defined", start)
        return v

    def arg(self, ln: _Line, depth: int = 0) -> object:
        ln.ws()
        if ln.peek("%"):
            return self.value(ln)
        if ln.peek('"'):
            return ln.string()
        if ln.peek("["):
            if depth >= MAX_NESTING:
                raise ln.error(f"lists nested deeper than {MAX_NESTING} levels")
            ln.eat("[")
            items: list[object] = []
            if not ln.eat("]"):
                items.append(self.arg(ln, depth + 1))
                while ln.eat(","):
                    items.append(self.arg(ln, depth + 1))
                ln.expect("]")
            return items
        m = _NUMBER.match(ln.text, ln.pos)
        if m and not _NAME.match(ln.text, ln.pos + (m.end() - m.start())):
            tok = m.group(0)
            if tok.lstrip("-").isdigit():
                return self.integer(ln, tok)
            ln.pos = m.end()
            return float(tok)
        start = ln.pos
        word = ln.match(_NAME, "an argument").group(0)
        consts = {"true": True, "false": False, "none": None}
        if word in consts:
            return consts[word]
        if word in ("dtype", "device", "layout", "memory_format"):
            ln.expect("(")
            inner = ln.string() if word == "device" else ln.match(_NAME, f"a {word} name").group(0)
            ln.expect(")")
            return self.enum(ln, word, inner, start)
        raise ln.error(f"unknown literal {word!r}", start)

    def integer(self, ln: _Line, tok: str) -> int:
        if len(tok) > 20 or not -SIZE_LIMIT <= int(tok) < SIZE_LIMIT:
            raise ln.error(f"integer {tok[:24]} is beyond 64 bits")
        ln.pos += len(tok)
        return int(tok)

    def enum(self, ln: _Line, kind: str, name: str, pos: int) -> object:
        if kind == "dtype":
            if name not in DTYPES:
                raise ln.error(f"unknown dtype {name!r}", pos)
            return DTYPES[name]
        if kind == "device":
            try:
                return torch.device(name)
            except RuntimeError:
                raise ln.error(f"bad device {name!r}", pos) from None
        obj = getattr(torch, name, None)
        want = torch.layout if kind == "layout" else torch.memory_format
        if not isinstance(obj, want):
            raise ln.error(f"unknown {kind} {name!r}", pos)
        return obj

    def type(self, ln: _Line) -> Type:
        start = ln.pos
        word = ln.match(_NAME, "a type").group(0)
        if word in ("int", "float", "bool"):
            expr = None
            if ln.eat("("):
                expr = self.expr(ln, ")")
            return ScalarType(word, expr)
        if word not in DTYPES:
            raise ln.error(f"unknown dtype {word!r}", start)
        ln.expect("[")
        dims = []
        if not ln.eat("]"):
            while True:
                if len(dims) == MAX_RANK:
                    raise ln.error(f"a tensor type has at most {MAX_RANK} dimensions")
                dims.append(self.expr(ln, ",]"))
                if ln.text[ln.pos - 1] == "]":
                    break
        return TensorType(DTYPES[word], tuple(dims))

    def expr(self, ln: _Line, stops: str):
        """Read a size expression up to a top-level character in ``stops`` and consume that character."""
        ln.ws()
        depth, i = 0, ln.pos
        while i < len(ln.text):
            c = ln.text[i]
            if depth == 0 and c in stops:
                break
            depth += (c == "(") - (c == ")")
            i += 1
        else:
            raise ln.error(f"size expression is not closed by {stops[-1]!r}")
        try:
            e = parse_expr(ln.text[ln.pos : i])
        except ValueError as exc:
            raise ln.error(f"{exc} in {ln.text[ln.pos : i]!r}") from None
        ln.pos = i + 1
        return e

    def line(self, ln: _Line) -> None:
        ln.ws()
        if ln.pos == len(ln.text) or ln.peek("#"):
            return
        for kw, fn in (
            ("symbol ", self.symbol),
            ("signature ", self.signature),
            ("input ", self.input),
            ("param ", self.weight),
            ("buffer ", self.weight),
            ("const ", self.weight),
        ):
            if ln.peek(kw):
                fn(ln)
                ln.end()
                return
        if ln.text.strip() == "output" or ln.peek("output "):
            ln.expect("output")
            ln.ws()
            if ln.pos < len(ln.text):
                self.prog.outputs.append(self.arg(ln))
                while ln.eat(","):
                    self.prog.outputs.append(self.arg(ln))
            ln.end()
            return
        self.node(ln)
        ln.end()

    def symbol(self, ln: _Line) -> None:
        ln.expect("symbol")
        start = ln.pos + 1
        name = ln.match(_NAME, "a symbol name").group(0)
        if name in self.prog.symbols:
            raise ln.error(f"symbol {name} is declared twice", start)
        ln.expect("in")
        ln.expect("[")
        ln.ws()
        lo = self.bound(ln)
        ln.expect(",")
        ln.ws()
        hi = None if ln.eat("inf") else self.bound(ln)
        ln.expect("]")
        if lo < 0 or (hi is not None and hi < lo):
            raise ln.error(f"symbol {name} has the empty or negative range [{lo}, {hi}]", start)
        self.prog.symbols[name] = [lo, hi]

    def bound(self, ln: _Line) -> int:
        ln.ws()
        m = _INT.match(ln.text, ln.pos)
        if not m:
            raise ln.error("expected an integer")
        return self.integer(ln, m.group(0))

    def signature(self, ln: _Line) -> None:
        ln.expect("signature")
        which = ln.match(re.compile(r"in|out"), "'in' or 'out'").group(0)
        spec = ln.json()
        if which == "in":
            self.prog.in_spec = spec
        else:
            self.prog.out_spec = spec

    def input(self, ln: _Line) -> None:
        ln.expect("input")
        pos = ln.pos + 1
        name = ln.match(_VALUE, "a value").group(1)
        ln.expect(":")
        self.prog.inputs.append(self.define(ln, name, self.type(ln), pos))

    def weight(self, ln: _Line) -> None:
        kind = ln.match(_NAME, "param, buffer or const").group(0)
        pos = ln.pos + 1
        name = ln.match(_VALUE, "a value").group(1)
        ln.expect(":")
        t = self.type(ln)
        ln.expect("=")
        key = ln.string()
        self.prog.weights.append(Weight(self.define(ln, name, t, pos), key, kind))

    def node(self, ln: _Line) -> None:
        outs: list[tuple[str, int]] = []
        if not ln.eat("_"):
            while True:
                ln.ws()
                start = ln.pos
                outs.append((ln.match(_VALUE, "a value or '_'").group(1), start))
                if not ln.eat(","):
                    break
        ln.expect("=")
        op = ln.match(_OP, "an op name").group(0)
        ln.expect("(")
        args: list[object] = []
        kwargs: dict[str, object] = {}
        if not ln.eat(")"):
            while True:
                ln.ws()
                kw = _KWARG.match(ln.text, ln.pos)
                if kw:
                    if kw.group(1) in kwargs:
                        raise ln.error(f"keyword argument {kw.group(1)!r} is given twice")
                    ln.pos = kw.end()
                    kwargs[kw.group(1)] = self.arg(ln)
                elif kwargs:
                    raise ln.error("positional argument after a keyword argument")
                else:
                    args.append(self.arg(ln))
                if not ln.eat(","):
                    break
            ln.expect(")")
        attrs = None
        ln.ws()
        brace = ln.pos
        if ln.eat("{"):
            data: dict[str, object] = {}
            while True:
                key = ln.match(_NAME, "an attribute name").group(0)
                if key in data:
                    raise ln.error(f"attribute {key!r} is given twice")
                ln.expect("=")
                data[key] = self.arg(ln)
                if not ln.eat(","):
                    break
            ln.expect("}")
            attrs = self.attrs(ln, data, brace)
        ln.expect(":")
        types: list[Type] = []
        if not ln.eat("none"):
            types.append(self.type(ln))
            while ln.eat(","):
                types.append(self.type(ln))
        if len(types) != len(outs):
            raise ln.error(f"{len(outs)} results but {len(types)} types")
        layer = ""
        if ln.eat("@"):
            layer = ln.string()
        values = [self.define(ln, name, t, pos) for (name, pos), t in zip(outs, types, strict=True)]
        self.prog.nodes.append(Node(op, args, kwargs, values, attrs, layer))

    def attrs(self, ln: _Line, data: dict[str, object], pos: int):
        fam = data.get("family")
        if not isinstance(fam, str) or fam not in FAMILIES:
            raise ln.error(f"unknown family {fam!r}; known: {', '.join(sorted(FAMILIES))}", pos)
        try:
            return FAMILIES[fam].from_dict(data)
        except (TypeError, ValueError, ArithmeticError) as e:
            raise ln.error(str(e), pos) from None


def parse(text: str) -> Program:
    """Parse IR text into a Program (without tensors; ``bundle.load`` attaches them)."""
    if not isinstance(text, str):
        raise ParseError(f"IR text must be a string, not {type(text).__name__}", 1, 1)
    if len(text) > MAX_TEXT:
        raise ParseError(f"IR text is longer than {MAX_TEXT} characters", 1, 1)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0].strip() != "itir 1":
        raise ParseError("expected the header 'itir 1'", 1, 1)
    p = _Parser()
    for i, raw in enumerate(lines[1:], start=2):
        raw = raw.removesuffix("\r")
        if len(raw) > MAX_LINE:
            raise ParseError(f"line longer than {MAX_LINE} characters", i, MAX_LINE + 1)
        bad = next((j for j, c in enumerate(raw) if c < " " and c != "\t"), None)
        if bad is not None:
            raise ParseError(f"control character {raw[bad]!r} in the text (escape it inside strings)", i, bad + 1)
        p.line(_Line(raw, i))
    return p.prog
