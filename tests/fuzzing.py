"""Fuzzing harness (issue #9): mutated printed programs through parse → verify → build → forward.

The contract under test: for any text, ``itc.parse`` → ``itc.build`` (torch backend) → a forward on small inputs
either succeeds or raises one ``ItnetError`` whose message is a single non-empty line, within ``TIME_LIMIT``
seconds; and nothing in a text ever runs code, imports a module or writes a file (the canary). Everything else is a
finding: another exception type, a multi-line message, a hang, a dead worker, a canary hit.

Seeds are printed programs of real models (``tests/fuzz_seeds/*.itir``; ``python tests/fuzzing.py --write-seeds``
regenerates them). A mutation is a function of a ``Chooser`` and a text, so the same code serves hypothesis (the CI
test draws every choice from ``st.data()`` and can replay it) and ``random.Random`` (``bench/fuzz.py``, text i of a
run is a function of (seed, i)).

Hangs inside C code (a huge integer power in sympy or Python) cannot be interrupted by a signal, so every text runs
in a forked ``Worker`` that is killed at the time limit; the worker also runs under memory and file-size limits,
in its own scratch directory, and reports each stage it enters so that a hang names its stage.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sympy  # noqa: E402
import torch  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.ir import treespec  # noqa: E402
from itnet_compiler.ir.types import ScalarType, TensorType  # noqa: E402

SEED_DIR = Path(__file__).resolve().parent / "fuzz_seeds"
TIME_LIMIT = 5.0  # seconds per text, parse to forward
MEMORY_HEADROOM = 4 << 30  # bytes of address space a worker may add to what it inherits
MAX_WEIGHT_NUMEL, MAX_INPUT_NUMEL, MAX_RANK = 1 << 22, 1 << 20, 16
CANARY_FILE = "itnet_fuzz_canary"  # created (relative to the worker's scratch directory) only by an executed payload
CANARY_MODULE = "itnet_fuzz_canary_mod"  # importable from the scratch directory; importing it creates the canary file
SELFTEST = "\x00selftest"  # sent instead of a text: the worker runs the payloads itself, to prove the canary fires
SLEEP = "\x00sleep"  # sent instead of a text: the worker sleeps, to prove that a hang is counted
# Audit events that no program text may cause; besides these, compiling or executing code that names the canary.
HOSTILE_EVENTS = tuple(
    "os.system os.exec os.posix_spawn os.spawn os.fork pty.spawn subprocess.Popen builtins.input builtins.breakpoint "
    "socket.connect ctypes.dlopen os.kill".split()
)


# --------------------------------------------------------------------------------------------------------- seeds
def _seed_models() -> dict[str, Callable[[], tuple[torch.nn.Module, tuple, dict, object]]]:
    """Real models, each small: (model, args, kwargs, dynamic_shapes)."""
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import models

    class Rnn(nn.Module):
        def __init__(self, rnn: nn.RNNBase):
            super().__init__()
            self.rnn = rnn

        def forward(self, x: torch.Tensor) -> object:
            return self.rnn(x)

    class ConvAttention(nn.Module):
        """A 1-d convolution in front of nn.MultiheadAttention and a LayerNorm, over a dynamic length."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(8, 16, 3, padding=1)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.norm = nn.LayerNorm(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
            a, _ = self.attn(h, h, h, need_weights=False)
            return self.norm(h + a)

    def case(make: Callable[[], models.Case]) -> Callable[[], tuple]:
        def build() -> tuple:
            c = make()
            return c.model, c.args, c.kwargs, c.dynamic_shapes

        return build

    def rnn(cls: type[nn.RNNBase], **kw: object) -> Callable[[], tuple]:
        def build() -> tuple:
            torch.manual_seed(0)
            t = torch.export.Dim("T", min=2, max=64)
            return Rnn(cls(8, 16, batch_first=True, **kw)).eval(), (torch.randn(2, 5, 8),), {}, {"x": {1: t}}

        return build

    def conv_attention() -> tuple:
        torch.manual_seed(0)
        t = torch.export.Dim("T", min=2, max=64)
        return ConvAttention().eval(), (torch.randn(2, 6, 8),), {}, {"x": {1: t}}

    return {
        "bert": case(lambda: models.bert("eager", dynamic=True)),
        "gpt2": case(lambda: models.gpt2("sdpa", dynamic=True)),
        "cnn": case(models.cnn),
        "encoder": case(lambda: models.encoder("padding")),
        "handwritten": case(models.handwritten),
        "conv_ops": case(models.conv_ops),
        "lstm": rnn(nn.LSTM, num_layers=2, bidirectional=True),
        "gru": rnn(nn.GRU),
        "conv_attention": conv_attention,
    }


def write_seeds(names: Sequence[str] | None = None) -> list[Path]:
    """Convert the seed models and write their printed programs (seconds each)."""
    SEED_DIR.mkdir(exist_ok=True)
    written = []
    for name, make in _seed_models().items():
        if names and name not in names:
            continue
        model, args, kwargs, dynamic = make()
        path = SEED_DIR / f"{name}.itir"
        path.write_text(str(itc.convert(model, args, kwargs, dynamic_shapes=dynamic)))
        written.append(path)
    return written


def load_seeds() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(SEED_DIR.glob("*.itir"))}


@functools.cache
def _seed_texts() -> tuple[str, ...]:
    return tuple(load_seeds().values())


# ------------------------------------------------------------------------------------------------------- choices
T = TypeVar("T")


class Chooser(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...

    def choice(self, items: Sequence[T]) -> T: ...


class RandomChooser:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, items: Sequence[T]) -> T:
        return items[self.rng.randrange(len(items))]


class DataChooser:
    """Choices drawn from hypothesis' ``st.data()``, so a failing example replays (and shrinks) choice by choice."""

    def __init__(self, data: object):
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def choice(self, items: Sequence[T]) -> T:
        return items[self.data.draw(self.st.integers(0, len(items) - 1))]


# ----------------------------------------------------------------------------------------------------- mutations
# Token lists are whitespace-separated; entries that need spaces or are computed are added as tuples.
HUGE_NUMBERS = (
    *"2 3 7 9**9**9 2**100000 (2**31)**(2**31) 1e20 -1 0 1.5 1e308 1e-320 nan inf -inf 2**63".split(),
    *"9223372036854775808 -9223372036854775809 0x10 1_0 +1 \u0663 -0.0 1e999".split(),
    "9" * 5000,
)
SIZE_EXPRS = tuple(
    "Mod(S,0) ceiling(S/0) floor(1/0) 0/0 S/0 9**9**9 2**100000 (2**31)**(2**31) S**S**S Max() Min(S) -1 0 -S S-100 "
    "1.5 1e20 oo zoo nan I pi floor S(1) Mod(S,S-S) 2**-1 (-1)**(1/2) Max(S,2**64) S**(1/2) S/2 2**62*S undeclared "
    "Max(S,S,S,S,S,S,S,S,S,S,S,S) -(-(-(-(-(-S))))) S*S*S*S*S*S*S*S*S*S*S*S*S*S*S*S".split()
) + ("x y", "")
NAMES = (
    *"class import lambda None True def .. 1x _ __class__ __init__ forward self a.b . 0 getattr torch fx".split(),
    *"__builtins__ inf nan output symbol \u00e9 a-b".split(),
    "x" * 5000,
    "",
)
WEIGHT_KEYS = (
    *". .. a..b __class__ forward training _modules __dict__.x gm _itnet_device register_buffer 0 a/b cuda to".split(),
    *"state_dict T_destination __annotations__ a.__class__ a.forward".split(),
    "",
    "x" * 5000,
    "\u0000",
    "a b",
)
GENERIC_OPS = tuple(
    "aten.relu.default aten.add.Tensor aten.mul.Tensor aten.linear.default aten.view.default aten.sym_size.int "
    "aten.transpose.int aten.layer_norm.default aten.embedding.default aten.split.Tensor aten.unbind.int "
    "aten.softmax.int aten.cat.default aten.zeros.default aten.as_strided.default aten.set_.source_Tensor "
    "aten.empty.memory_format aten.resize_.default aten._local_scalar_dense.default aten.nonexistent.default aten.add "
    "aten.add.Tensor.extra it.transform prims.view_of.default aten.copy_.default aten.fill_.Scalar "
    "aten.randperm.default aten._assert_async.msg operator.mul operator.getitem operator.setitem operator.delitem "
    "torch.sym_max torch.sym_not torch.nope math.ceil _operator.add nope.x.y aten.item.default aten.nonzero.default "
    "aten.index_put_.default aten.scatter_.src aten.bernoulli.p aten.empty_strided.default aten.new_empty.default "
    "aten.unfold.default aten.expand.default aten.repeat.default aten.arange.start operator.floordiv operator.mod "
    "operator.truediv operator.lshift operator.pow math.sqrt math.log builtins.int builtins.float builtins.round "
    "torch.sym_int torch.sym_sum torch.sym_ite aten.lift_fresh_copy.default aten.alias.default "
    "aten.detach_.default".split()
)
HOSTILE_OPS = tuple(
    "builtins.eval builtins.exec builtins.__import__ builtins.open operator.attrgetter builtins.getattr "
    "aten.from_file.default math.factorial builtins.setattr builtins.compile builtins.globals builtins.vars "
    "builtins.exit builtins.input builtins.breakpoint operator.call operator.methodcaller operator.pow builtins.pow "
    "math.perm builtins.type builtins.print builtins.memoryview builtins.delattr math.comb aten.save aten._print "
    "aten.load aten._debug_has_internal_overlap.default aten.set_.source_Storage aten._print.default "
    "torch.load torch.save builtins.__build_class__ operator.index math.isqrt".split()
)
ATTR_VALUES = (
    *'0 [] "x" 1e20 %V none true -1 nan inf [[[]]] "auto" "fused" "window(0)" "window(-1)" "library:x="'.split(),
    *'"window(99999999999999999999)" "montecarlo:samples=0" "lowrank:rank=-1" "dense:=1" -0.0'.split(),
    *'[1,2,3,4,5,6,7,8,9] [-1,-1] [[0,-5],[2**31,1]] [0,0] 99999999999 2147483647 "stationary" "gated"'.split(),
    *'"ssm" "dot_exp" "nope"'.split(),
    *'dtype(f32) [%V] "fused:block=0" "fused:block=99999999" "montecarlo:seed=-1" "chunked:chunk=0" "scan"'.split(),
    *'"window(1)" "causal" "grid" "library:a=1,a=2" [1e20] [true] [none] ["x"]'.split(),
    "9" * 5000,
    '"' + "x" * 300 + '"',
)
LAYERS = (
    r'"a\nb"',
    r'"\u0000"',
    r'"\r"',
    r'"\u2028"',
    r'"\u001b[31m"',
    '"a\nb"',
    '"a\tb"',
    '"*"',
    '"encoder.*"',
    '""',
    r'"a\"b"',
    r'"\ud800"',
    '"' + "x" * 100000 + '"',
    r'"\n"',
    "5",
    "none",
    '"a',
    r'"a\x"',
)
CODE = f"open('{CANARY_FILE}', 'w').close()"
# Hostile lines: {V} is an existing value; the last value a line defines is also appended to the outputs.
PAYLOADS = (
    f'_ = builtins.exec("{CODE}") : none',
    f'%pwn = builtins.exec("{CODE}") : none',
    f'%pwn = builtins.eval("{CODE}") : int',
    f"%pwn = builtins.eval(\"__import__('os').system('touch {CANARY_FILE}')\") : int",
    f'%pwn = builtins.open("{CANARY_FILE}", "w") : int',
    f'%pwn = builtins.__import__("{CANARY_MODULE}") : int',
    f'%pwn = aten.from_file.default("{CANARY_FILE}", true, 4) : f32[4]',
    f'%os = builtins.__import__("os") : int\n%mc = operator.methodcaller("system", "touch {CANARY_FILE}") : int\n'
    "%pwn = operator.call(%mc, %os) : int",
    '%pwn = builtins.getattr({V}, "__class__") : int',
    '%ag = operator.attrgetter("__class__.__init__.__globals__") : int\n%pwn = operator.call(%ag, {V}) : int',
    f'%pwn = builtins.compile("{CODE}", "f", "exec") : int\n_ = builtins.exec(%pwn) : none',
    "%pwn = math.factorial(100000000) : int",
    "%pwn = operator.pow(9, 999999999) : int",
    "_ = builtins.exit() : none",
    "_ = builtins.input() : none",
    "_ = builtins.breakpoint() : none",
    '_ = builtins.setattr({V}, "__class__", 0) : none',
    "%pwn = builtins.globals() : int",
    '%pwn = operator.attrgetter("__class__") : int',
    "%pwn = aten.as_strided.default({V}, [1000000], [1000000]) : f32[1000000]",
)

_NUM = re.compile(r"(?<![\w%.\"])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.])")
_VALUE = re.compile(r"%[A-Za-z0-9_.]+")
_TYPE = re.compile(r"\b(f64|f32|f16|bf16|i64|i32|i16|i8|u8|b8|c64|c128)\[([^\]]*)\]")
_OPNAME = re.compile(r"= ([A-Za-z_][\w.]*)\(")
_KWNAME = re.compile(r"(?<=[(,] )([A-Za-z_]\w*)=|(?<=\()([A-Za-z_]\w*)=")
_LAYER = re.compile(r'@"(?:[^"\\]|\\.)*"[ \t]*$', re.M)
_ATTRS = re.compile(r"\) \{(.*)\} : ")
_WEIGHT_KEY = re.compile(r'^(param|buffer|const) (%\S+) : (.*) = ("(?:[^"\\]|\\.)*")$')
_DTYPE_NAMES = ("f64", "f32", "f16", "bf16", "i64", "i32", "i16", "i8", "u8", "b8", "c64", "c128")


def _lines(text: str) -> list[str]:
    return text.split("\n")


def _node_indices(lines: list[str]) -> list[int]:
    return [
        i for i, ln in enumerate(lines) if " = " in ln and "(" in ln and not ln.startswith(("param", "buffer", "const"))
    ]


def _symbol(text: str) -> str:
    m = re.search(r"^symbol (\w+) in", text, re.M)
    return m.group(1) if m else "s"


def _a_value(ch: Chooser, text: str) -> str:
    values = _VALUE.findall(text[:20000]) or ["%x"]
    return ch.choice(values)


def _replace_match(ch: Chooser, text: str, pattern: re.Pattern[str], make: Callable[[re.Match[str]], str]) -> str:
    """Replace one match of ``pattern`` (chosen among the first 2000) by ``make(match)``."""
    matches = [m for _, m in zip(range(2000), pattern.finditer(text), strict=False)]
    if not matches:
        return text
    m = ch.choice(matches)
    return text[: m.start()] + make(m) + text[m.end() :]


def _at_line(ch: Chooser, text: str, indices: Callable[[list[str]], list[int]], edit: Callable[[str], str]) -> str:
    lines = _lines(text)
    idx = indices(lines)
    if not idx:
        return text
    i = ch.choice(idx)
    lines[i] = edit(lines[i])
    return "\n".join(lines)


ALPHABET = tuple('%[](){},:=@"\\#\n\t\x00 -+*/.0123456789eEaxsf_\u00e9\u2028\x85\ud800\x1b') + ("inf", "none")


def m_char(ch: Chooser, text: str) -> str:
    """Insert, delete or replace a few characters anywhere."""
    pos = ch.integer(0, max(len(text) - 1, 0))
    op = ch.choice(("insert", "delete", "replace", "delete_span", "dup_span"))
    c = ch.choice(ALPHABET)
    if op == "insert":
        return text[:pos] + c + text[pos:]
    if op == "delete":
        return text[:pos] + text[pos + 1 :]
    if op == "replace":
        return text[:pos] + c + text[pos + 1 :]
    n = ch.integer(1, 40)
    if op == "delete_span":
        return text[:pos] + text[pos + n :]
    return text[: pos + n] + text[pos : pos + n] + text[pos + n :]


def m_number(ch: Chooser, text: str) -> str:
    """A number token becomes huge, negative, zero, a float or an expression."""
    return _replace_match(ch, text, _NUM, lambda m: ch.choice(HUGE_NUMBERS))


def m_size_expr(ch: Chooser, text: str) -> str:
    """One dimension of a type (or a symbol range bound) becomes a hostile size expression."""
    s = _symbol(text)

    def dims(m: re.Match[str]) -> str:
        parts = m.group(2).split(",") if m.group(2) else [""]
        i = ch.integer(0, len(parts) - 1)
        parts[i] = ch.choice(SIZE_EXPRS).replace("S", s)
        return f"{m.group(1)}[{','.join(parts)}]"

    if ch.integer(0, 5) == 0:
        bound = ch.choice(
            (
                "[5, 2]",
                "[-1, 0]",
                "[0, 99999999999999999999]",
                "[2, 1e20]",
                "[0, 0]",
                "[2, -inf]",
                "[" + "9" * 5000 + ", inf]",
                "[2**31, inf]",
                "[1, 2]",
            )
        )
        return re.sub(r"^(symbol \w+ in )\[[^\]]*\]", lambda m: m.group(1) + bound, text, count=1, flags=re.M)
    return _replace_match(ch, text, _TYPE, dims)


def m_name(ch: Chooser, text: str) -> str:
    """A value, symbol, keyword-argument name or weight key becomes a keyword, '..', '1x', empty or very long."""
    what = ch.choice(("value", "value_all", "symbol", "kwarg", "weight_key"))
    name = ch.choice(NAMES)
    if what in ("value", "value_all"):
        old = _a_value(ch, text)
        if what == "value":
            return _replace_match(ch, text, re.compile(re.escape(old) + r"(?![\w.])"), lambda m: "%" + name)
        return re.sub(re.escape(old) + r"(?![\w.])", lambda m: "%" + name, text)
    if what == "symbol":
        s = _symbol(text)
        return re.sub(rf"\b{re.escape(s)}\b", lambda m: name, text) if s != "s" else text
    if what == "kwarg":
        return _replace_match(ch, text, _KWNAME, lambda m: f"{name}=")
    key = ch.choice(WEIGHT_KEYS)
    return _at_line(
        ch,
        text,
        lambda ls: [i for i, ln in enumerate(ls) if _WEIGHT_KEY.match(ln)],
        lambda ln: ln[: ln.rindex(' = "')] + " = " + json.dumps(key),
    )


def m_op(ch: Chooser, text: str) -> str:
    """A node's op becomes another op: generic, unknown, or hostile (builtins.eval, math.factorial, ...)."""
    ops = GENERIC_OPS + HOSTILE_OPS + tuple(dict.fromkeys(_OPNAME.findall(text)))
    return _replace_match(ch, text, _OPNAME, lambda m: f"= {ch.choice(ops)}(")


def m_payload(ch: Chooser, text: str) -> str:
    """A hostile line (exec, eval, __import__, open, from_file, getattr chains, factorial) before the outputs."""
    payload = ch.choice(PAYLOADS).replace("{V}", _a_value(ch, text))
    lines = _lines(text)
    out = max((i for i, ln in enumerate(lines) if ln.startswith("output")), default=len(lines) - 1)
    defined = _VALUE.findall(payload.split("\n")[-1].split(" = ")[0])
    where = ch.choice(("before_output", "replace_output", "append_output", "first_node"))
    if where == "first_node":
        nodes = _node_indices(lines)
        out = nodes[0] if nodes else out
        lines.insert(out, payload)
    elif where == "before_output" or not defined:
        lines.insert(out, payload)
    elif where == "replace_output":
        lines[out : out + 1] = [payload, "output " + defined[0]]
    else:
        lines[out : out + 1] = [payload, lines[out] + (", " if lines[out] != "output" else " ") + defined[0]]
    return "\n".join(lines)


def _split_top(s: str) -> list[str]:
    """Split at top-level commas (outside brackets, parentheses and strings)."""
    parts, depth, cur, quote = [], 0, [], False
    for i, c in enumerate(s):
        if quote:
            quote = not (c == '"' and s[i - 1] != "\\")
        elif c == '"':
            quote = True
        elif c in "[(":
            depth += 1
        elif c in "])":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(c)
    parts.append("".join(cur))
    return parts


def m_attrs(ch: Chooser, text: str) -> str:
    """One attribute of an it.transform gets a wrong type or value; or a key is dropped, duplicated or invented."""

    def edit(m: re.Match[str]) -> str:
        items = [p.strip() for p in _split_top(m.group(1))]
        i = ch.integer(0, len(items) - 1)
        op = ch.choice(("value", "value", "value", "drop", "dup", "new"))
        key = items[i].split("=", 1)[0]
        if op == "value":
            items[i] = f"{key}={ch.choice(ATTR_VALUES).replace('%V', _a_value(ch, text))}"
        elif op == "drop":
            del items[i]
        elif op == "dup":
            items.insert(i, items[i])
        else:
            items.insert(i, f"{ch.choice(('extra', 'class', '__init__', 'lowering', 'family'))}=1")
        return ") {" + ", ".join(items) + "} : "

    return _replace_match(ch, text, _ATTRS, edit)


def m_nesting(ch: Chooser, text: str) -> str:
    """Deep nesting: 10**4 '[' in an argument, '(' or '-' in a size expression, 10**5 levels of JSON."""
    n = ch.choice((100, 1000, 10_000, 100_000))
    kind = ch.choice(("list", "list_open", "paren", "minus", "json", "json_obj", "output"))
    if kind in ("json", "json_obj"):
        deep = "[" * n + "]" * n if kind == "json" else '{"a":' * n + "1" + "}" * n
        which = ch.choice(("in", "out"))
        new = f"signature {which} {deep}"
        if re.search(rf"^signature {which} ", text, re.M):
            return re.sub(rf"^signature {which} .*$", lambda m: new, text, count=1, flags=re.M)
        return text.replace("\n", "\n" + new + "\n", 1)
    if kind == "output":
        return re.sub(r"^output.*$", lambda m: "output " + "[" * n + "]" * n, text, count=1, flags=re.M)
    if kind in ("paren", "minus"):
        expr = "(" * n + "1" + ")" * n if kind == "paren" else "-" * n + "1"
        return _replace_match(ch, text, _TYPE, lambda m: f"{m.group(1)}[{expr}]")
    deep = "[" * n + ("]" * n if kind == "list" else "")
    return _replace_match(ch, text, re.compile(r"(?<=[(=])%[\w.]+|(?<=, )%[\w.]+"), lambda m: deep)


def m_long(ch: Chooser, text: str) -> str:
    """A very long line: a long name, string, number, list, rank or trailing garbage."""
    n = ch.choice((10_000, 100_000, 1_000_000))
    kind = ch.choice(("name", "string", "number", "list", "rank", "garbage", "kwargs", "outputs"))
    if kind == "name":
        return _replace_match(ch, text, _VALUE, lambda m: "%" + "v" * n)
    if kind == "string":
        return _replace_match(ch, text, _LAYER, lambda m: '@"' + "x" * n + '"')
    if kind == "number":
        return _replace_match(ch, text, _NUM, lambda m: "7" * min(n, 100_000))
    if kind == "list":
        return _replace_match(ch, text, _NUM, lambda m: "[" + ", ".join(["1"] * (n // 3)) + "]")
    if kind == "rank":
        return _replace_match(ch, text, _TYPE, lambda m: f"{m.group(1)}[{','.join(['1'] * (n // 2))}]")
    if kind == "kwargs":
        extra = "".join(f", k{i}=1" for i in range(n // 8))
        return _replace_match(ch, text, re.compile(r"\) : "), lambda m: extra + ") : ")
    if kind == "outputs":
        return re.sub(
            r"^output.*$", lambda m: "output " + ", ".join([_a_value(ch, text)] * (n // 8)), text, count=1, flags=re.M
        )
    return _at_line(ch, text, lambda ls: list(range(len(ls))), lambda ln: ln + " " + "x" * n)


def m_layer(ch: Chooser, text: str) -> str:
    """The ``@"layer"`` string gets newlines, control characters, a lone surrogate, globs, or is malformed."""
    layer = ch.choice(LAYERS)
    return _replace_match(ch, text, _LAYER, lambda m: "@" + layer)


SIGNATURES = (
    f'{{"type":"{CANARY_MODULE}.T","context":null,"children":["*"]}}',
    '{"type":"os.system","context":null,"children":[]}',
    '{"type":"builtins.eval","context":null,"children":[]}',
    '{"type":"subprocess.Popen","context":null,"children":["*"]}',
    '{"type":"builtins.object","context":null,"children":[]}',
    '{"type":5}',
    '{"type":"builtins.tuple","context":null,"children":"**"}',
    '{"type":"builtins.dict","context":5,"children":["*"]}',
    '{"type":"builtins.dict","context":["a","a"],"children":["*","*"]}',
    '{"type":"builtins.tuple","context":null,"children":[5]}',
    '{"type":"builtins.tuple","context":{"type":"builtins.eval"},"children":[]}',
    '{"type":"collections.OrderedDict","context":null,"children":["*"]}',
    '{"type":".","context":null,"children":[]}',
    '{"type":"","context":null,"children":[]}',
    '{"type":"builtins.list","context":null,"children":["*","*","*","*","*","*","*","*","*","*"]}',
    '"*"',
    "[]",
    "null",
    "{}",
    "1e999",
    "NaN",
    '"' + "*" * 100 + '"',
    "{",
    "",
)


def m_signature(ch: Chooser, text: str) -> str:
    """The signature JSON names other types (a module importing which would be code execution), or is malformed."""
    which = ch.choice(("in", "out"))
    sig = ch.choice(SIGNATURES)
    if ch.integer(0, 3) == 0:  # nested inside a valid tuple
        sig = f'{{"type":"builtins.tuple","context":null,"children":[{sig or "*"}]}}'
    new = f"signature {which} {sig}"
    if re.search(rf"^signature {which} ", text, re.M):
        return re.sub(rf"^signature {which} .*$", lambda m: new, text, count=1, flags=re.M)
    return text.replace("\n", "\n" + new + "\n", 1)


def m_lines(ch: Chooser, text: str) -> str:
    """Delete, duplicate, swap or move lines; change the header."""
    lines = _lines(text)
    n = len(lines)
    i, j = ch.integer(0, n - 1), ch.integer(0, n - 1)
    op = ch.choice(
        (
            "delete",
            "delete",
            "dup",
            "swap",
            "swap_adjacent",
            "move",
            "delete_range",
            "truncate",
            "header",
            "reverse_tail",
        )
    )
    if op == "delete":
        del lines[i]
    elif op == "dup":
        lines.insert(i, lines[i])
    elif op == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "swap_adjacent":
        k = min(i, n - 2)
        lines[k], lines[k + 1] = lines[k + 1], lines[k]
    elif op == "move":
        lines.insert(j, lines.pop(i))
    elif op == "delete_range":
        lo = min(i, j)
        del lines[lo : min(max(i, j) + 1, lo + 50)]
    elif op == "truncate":
        lines = lines[: max(i, 1)]
    elif op == "header":
        lines[0] = ch.choice(("itir 2", "itir 1 ", "", "\ufeffitir 1", "itir", "itir 1 # x", "ITIR 1"))
    else:
        lines[i:] = lines[i:][::-1]
    return "\n".join(lines)


def m_type(ch: Chooser, text: str) -> str:
    """A declared type disagrees with what its op produces: another dtype, size, rank, a scalar type, or none."""

    def edit(m: re.Match[str]) -> str:
        dims = m.group(2).split(",") if m.group(2) else []
        op = ch.choice(("dtype", "dim", "add_dim", "drop_dim", "scalar", "empty"))
        if op == "dtype":
            return f"{ch.choice(_DTYPE_NAMES)}[{m.group(2)}]"
        if op == "dim" and dims:
            dims[ch.integer(0, len(dims) - 1)] = ch.choice(("7", "1", "0", "3", "1000"))
        elif op == "add_dim":
            dims.insert(ch.integer(0, len(dims)), ch.choice(("1", "7")))
        elif op == "drop_dim" and dims:
            del dims[ch.integer(0, len(dims) - 1)]
        elif op == "scalar":
            return ch.choice(("int", "float", "bool", f"int({_symbol(text)})", "int(7)", "float(0)", "none"))
        elif op == "empty":
            return f"{m.group(1)}[]"
        return f"{m.group(1)}[{','.join(dims)}]"

    return _replace_match(ch, text, _TYPE, edit)


LITERALS = (
    *'0 1 -1 2 7 100 -2 1.5 1e-12 nan inf true false none "x" [] [1] [2,3] [-1] dtype(f16) dtype(i64)'.split(),
    *'dtype(b8) dtype(c64) device("meta") device("cuda") device("cpu") device("cuda:99") layout(sparse_coo)'.split(),
    *"[none] [[1]]".split(),
    *"memory_format(channels_last) memory_format(preserve_format) -9223372036854775808 9223372036854775807".split(),
)


def _call_span(line: str) -> tuple[int, int] | None:
    """Start and end of the text between a node's call parentheses."""
    m = _OPNAME.search(line)
    if not m:
        return None
    depth, quote = 0, False
    for i in range(m.end() - 1, len(line)):
        c = line[i]
        if quote:
            quote = not (c == '"' and line[i - 1] != "\\")
        elif c == '"':
            quote = True
        elif c in "[(":
            depth += 1
        elif c in "])":
            depth -= 1
            if depth == 0:
                return m.end(), i
    return None


def m_arg(ch: Chooser, text: str) -> str:
    """A call argument (grammatical, so it reaches verify, build and forward) becomes another value or literal, or is
    dropped, or an argument is added."""
    lines = _lines(text)
    nodes = [i for i in _node_indices(lines) if _call_span(lines[i])]
    if not nodes:
        return text
    i = ch.choice(nodes)
    start, end = _call_span(lines[i])
    items = [p.strip() for p in _split_top(lines[i][start:end])] if lines[i][start:end].strip() else []
    op = ch.choice(("value", "value", "literal", "literal", "drop", "add", "add_kw"))
    earlier = list(dict.fromkeys(_VALUE.findall("\n".join(lines[:i])))) or ["%x"]
    if op in ("drop", "value", "literal") and not items:
        op = "add"
    k = ch.integer(0, max(len(items) - 1, 0))
    if op == "value" or op == "literal":
        name, eq, val = items[k].rpartition("=") if re.match(r"^\w+=", items[k]) else ("", "", items[k])
        items[k] = name + eq + (ch.choice(earlier) if op == "value" else ch.choice(LITERALS))
    elif op == "drop":
        del items[k]
    elif op == "add":
        positional = [j for j, it in enumerate(items) if not re.match(r"^\w+=", it)]
        items.insert(len(positional), ch.choice([*LITERALS, *earlier]))
    else:
        items.append(f"{ch.choice(('alpha', 'dim', 'out', 'dtype', 'inplace', 'x', 'self'))}={ch.choice(LITERALS)}")
    lines[i] = lines[i][:start] + ", ".join(items) + lines[i][end:]
    return "\n".join(lines)


def m_splice(ch: Chooser, text: str) -> str:
    """A line of another seed program replaces or joins a line of this one."""
    other = _lines(ch.choice(_seed_texts()))
    line = ch.choice(other[1:] or [""])
    lines = _lines(text)
    i = ch.integer(1, max(len(lines) - 1, 1))
    if ch.integer(0, 1):
        lines[i] = line
    else:
        lines.insert(i, line)
    return "\n".join(lines)


def m_call(ch: Chooser, text: str) -> str:
    """The built module is called wrongly or unusually: other dtypes, shapes, ranks, too many or too few inputs, an
    unknown keyword, None, meta tensors, NaNs, sizes at the ends of the symbol ranges (a harness directive)."""
    return text.rstrip("\n") + f"\n# fuzz: call={ch.choice(CALLS)}\n"


def m_bundle(ch: Chooser, text: str) -> str:
    """The program goes through a saved bundle that is then damaged: meta.json, weights.safetensors' header and data,
    files replaced by directories or /dev/zero (a harness directive)."""
    return text.rstrip("\n") + f"\n# fuzz: bundle={ch.choice(BUNDLES)}\n"


def m_plan(ch: Chooser, text: str) -> str:
    """The program is built with a plan forcing one lowering on every layer, valid or not (a harness directive)."""
    return text.rstrip("\n") + f"\n# fuzz: plan={ch.choice(PLANS)}\n"


MUTATIONS: dict[str, Callable[[Chooser, str], str]] = {
    "char": m_char,
    "number": m_number,
    "size_expr": m_size_expr,
    "name": m_name,
    "op": m_op,
    "payload": m_payload,
    "attrs": m_attrs,
    "nesting": m_nesting,
    "long": m_long,
    "layer": m_layer,
    "signature": m_signature,
    "lines": m_lines,
    "type": m_type,
    "splice": m_splice,
    "arg": m_arg,
    "call": m_call,
    "bundle": m_bundle,
    "plan": m_plan,
}


def mutate(
    ch: Chooser, seeds: dict[str, str], kinds: Sequence[str] | None = None, most: int = 3
) -> tuple[str, list[str], str]:
    """(seed name, mutation kinds applied, text): one to ``most`` mutations of one seed."""
    name = ch.choice(sorted(seeds))
    text = seeds[name]
    applied = []
    for _ in range(ch.integer(1, most)):
        kind = ch.choice(list(kinds or MUTATIONS))
        text = MUTATIONS[kind](ch, text)
        applied.append(kind)
    return name, applied, text


# ------------------------------------------------------------------------------------------------------ pipeline
@dataclass
class Outcome:
    """``status``: ok | itnet_error (both clean) | bad_message | exception | hang | crash | harness."""

    status: str
    stage: str  # the last stage entered: parse, verify, build, inputs, forward
    exc_type: str = ""
    message: str = ""
    canary: str = ""  # what an executed payload did (a created canary file, an audit event), "" if nothing
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return self.status in ("ok", "itnet_error") and not self.canary

    def key(self) -> tuple[str, str, str, str]:
        """Findings group by (status, stage, exception type, message with numbers, names and strings elided)."""
        return ("canary" if self.canary else self.status, self.stage, self.exc_type, normalise(self.message))


def normalise(message: str) -> str:
    msg = message.splitlines()[0] if message.strip() else message
    msg = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "'…'", msg[:300])
    msg = re.sub(r"%[\w.]+", "%v", msg)
    msg = re.sub(r"(?<![\w.])/[\w.\-/]+", "<path>", msg)
    msg = re.sub(r"TreeSpec\(.*", "TreeSpec(…)", msg)
    return re.sub(r"\d+", "N", msg)


def _stage_of(exc: BaseException, stage: str) -> str:
    if stage != "parse":
        return stage
    files = [f.filename for f in traceback.extract_tb(exc.__traceback__)]
    return "verify" if any(f.endswith(os.path.join("ir", "verify.py")) for f in files) else "parse"


def attach_tensors(prog: itc.Program, gen: torch.Generator) -> None:
    """A random tensor of its declared type for every weight whose type is concrete and small."""
    total = 0
    for w in prog.weights:
        shape = _concrete(w.value.type, {})
        if shape is None or w.key in prog.tensors:
            continue
        numel = _numel(shape)
        if numel > MAX_WEIGHT_NUMEL or total + numel > 4 * MAX_WEIGHT_NUMEL:
            continue
        total += numel
        prog.tensors[w.key] = _random(w.value.type.dtype, shape, gen)


def _concrete(t: object, sizes: dict[sympy.Symbol, int]) -> list[int] | None:
    if not isinstance(t, TensorType) or t.rank > MAX_RANK:
        return None
    shape = []
    for d in t.shape:
        v = d.subs(sizes) if sizes and d.free_symbols else d
        if not v.is_Integer or v < 0 or v > 1 << 40:
            return None
        shape.append(int(v))
    return shape


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _random(dtype: torch.dtype, shape: list[int], gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(0, 2, shape, generator=gen, dtype=dtype)  # small ints index every embedding


def make_inputs(prog: itc.Program, gen: torch.Generator, at: str = "mid") -> tuple[list[object], str]:
    """Inputs of the declared types, every symbol at 5 (``at="mid"``), its minimum or min(max, 64), clamped into its
    range; ([], reason) when no such inputs exist."""
    sizes = {}
    for name, (lo, hi) in prog.symbols.items():
        want = {"mid": 5, "lo": lo, "hi": 64 if hi is None else min(hi, 64)}[at]
        sizes[sympy.Symbol(name, integer=True, positive=True)] = max(lo, want) if hi is None else min(max(lo, want), hi)
    flat, total = [], 0
    for v in prog.inputs:
        if isinstance(v.type, ScalarType):
            e = v.type.expr.subs(sizes) if v.type.expr is not None else sympy.Integer(1)
            flat.append({"int": int(e) if e.is_Integer else 1, "float": 1.0, "bool": True}[v.type.kind])
            continue
        shape = _concrete(v.type, sizes)
        if shape is None:
            return [], f"input %{v.name} : {v.type} has no concrete size"
        total += _numel(shape)
        if total > MAX_INPUT_NUMEL:
            return [], "inputs too large"
        flat.append(_random(v.type.dtype, shape, gen))
    return flat, ""


# ``# fuzz: call=NAME`` in a text (a comment to the parser) makes the harness call the built module wrongly or
# unusually; ``# fuzz: bundle=NAME`` routes the program through save, a corruption of the bundle, and itc.load;
# ``# fuzz: plan=LOWERING`` builds with ``plan={"*": LOWERING}``.
CALLS = tuple(
    "lo hi twice dtype shape rank missing extra kwarg none scalar list noncontig nan meta grad empty_kwargs".split()
)
BUNDLES = tuple(
    "plain meta_garbage meta_deep meta_format meta_bigint meta_list meta_example meta_fallbacks weights_truncate "
    "weights_empty weights_header_huge weights_header_deep weights_dtype weights_dtype_size weights_shape "
    "weights_offsets weights_overlap weights_drop_key weights_metadata weights_devzero program_dir program_bytes "
    "program_devzero meta_dir".split()
)


PLANS = (
    *"dense fused library fft scan chunked montecarlo:samples=16,seed=0 lowrank:rank=4".split(),
    *"lowrank:method=favor,rank=8".split(),
    *"montecarlo:samples=0 lowrank:rank=-1 fused:block=0 nope dense:x=1 * montecarlo:samples=99999999999 auto".split(),
    *"library:=1 fused:block=16,block=32 montecarlo:proposal=nope lowrank:method=nystrom,rank=2 newton".split(),
)


def _directive(text: str, name: str) -> str:
    m = re.search(rf"^# fuzz: {name}=(\S+)$", text, re.M)
    return m.group(1) if m else ""


def _miscall(call: str, flat: list[object]) -> tuple[list[object], dict[str, object]]:
    """The inputs for a ``call=`` directive (``lo``, ``hi``, ``twice`` are sizes and change nothing here)."""
    first = next((i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)), None)
    flat, kwargs = list(flat), {}
    if call == "missing" and flat:
        flat.pop()
    elif call == "extra":
        flat.append(torch.zeros(2))
    elif call == "kwarg":
        kwargs["itnet_fuzz_unknown"] = torch.zeros(1)
    elif call in ("none", "scalar", "list") and first is not None:
        flat[first] = {"none": None, "scalar": 3, "list": [1, 2]}[call]
    elif first is not None:
        x = flat[first]
        if call == "dtype":
            flat[first] = x.to(torch.float64 if x.dtype != torch.float64 else torch.int32)
        elif call == "shape" and x.dim():
            flat[first] = torch.zeros(*x.shape[:-1], x.shape[-1] + 1, dtype=x.dtype)
        elif call == "rank":
            flat[first] = x.unsqueeze(0)
        elif call == "noncontig" and x.dim() >= 2:
            flat[first] = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        elif call == "nan" and x.is_floating_point():
            flat[first] = torch.full_like(x, float("nan"))
        elif call == "meta":
            flat = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in flat]
        elif call == "grad":
            flat = [t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in flat]
    return flat, kwargs


def call_module(mod: torch.nn.Module, prog: itc.Program, flat: list[object], call: str = "") -> object:
    """Call as the source model was called (the signature's structure), or with the flat inputs if that has none."""
    flat, extra = _miscall(call, flat)
    args, kwargs = flat, {}
    with contextlib.suppress(Exception):
        spec = treespec.from_json(prog.in_spec) if prog.in_spec is not None else None
        if spec is not None and spec.num_leaves == len(flat):
            tree = pytree.tree_unflatten(flat, spec)
            if isinstance(tree, tuple) and len(tree) == 2 and isinstance(tree[1], dict):
                args, kwargs = tree
    if call == "empty_kwargs":
        args, kwargs = flat, {}
    with torch.set_grad_enabled(call == "grad"):
        return mod(*args, **kwargs, **extra)


def _safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_safetensors(path: Path, header: dict | str, data: bytes) -> None:
    head = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + data)


def corrupt_bundle(where: Path, how: str) -> None:
    """Damage a saved bundle as ``how`` says (``plain``: leave it)."""
    meta, weights, program = where / "meta.json", where / "weights.safetensors", where / "program.itir"
    metas = {
        "meta_garbage": "{",
        "meta_deep": "[" * 100_000 + "]" * 100_000,
        "meta_format": '{"format": 2}',
        "meta_bigint": '{"format": ' + "9" * 5000 + "}",
        "meta_list": "[]",
        "meta_example": '{"format": 1, "example": {"sizes": {"T": -1}, "inputs": [{"name": 5}]}}',
        "meta_fallbacks": '{"format": 1, "fallbacks": {"layers": {"a": 5}}}',
    }
    if how in metas:
        meta.write_text(metas[how])
    elif how.startswith("weights") and weights.exists():
        header, data = _safetensors(weights)
        keys = [k for k in header if k != "__metadata__"]
        k = keys[0] if keys else "x"
        if how == "weights_truncate":
            weights.write_bytes(weights.read_bytes()[: max(weights.stat().st_size // 2, 1)])
        elif how == "weights_empty":
            weights.write_bytes(b"")
        elif how == "weights_header_huge":
            weights.write_bytes((2**63 - 1).to_bytes(8, "little") + b"{}")
        elif how == "weights_header_deep":
            _write_safetensors(weights, "[" * 100_000 + "]" * 100_000, data)
        elif how == "weights_metadata":
            _write_safetensors(weights, {**header, "__metadata__": {"x": 5, "y": [1]}}, data)
        elif keys and how == "weights_drop_key":
            del header[k]
            _write_safetensors(weights, header, data)
        elif keys:
            t = header[k]
            if how == "weights_dtype":
                t["dtype"] = "F64" if t["dtype"] != "F64" else "F32"
            elif how == "weights_dtype_size":
                t["dtype"] = {"F32": "I32", "I64": "F64", "F64": "I64", "BOOL": "U8"}.get(t["dtype"], "F32")
            elif how == "weights_shape":
                t["shape"] = [2**40]
            elif how == "weights_offsets":
                t["data_offsets"] = [0, 2**62]
            elif how == "weights_overlap":
                for key in keys:
                    header[key]["data_offsets"] = [0, header[key]["data_offsets"][1] - header[key]["data_offsets"][0]]
            _write_safetensors(weights, header, data)
        if how == "weights_devzero":
            weights.unlink()
            weights.symlink_to("/dev/zero")
    elif how == "program_dir":
        program.unlink()
        program.mkdir()
    elif how == "program_bytes":
        program.write_bytes(b"itir 1\n\xff\xfe\x00 garbage\n")
    elif how == "program_devzero":
        program.unlink()
        program.symlink_to("/dev/zero")
    elif how == "meta_dir":
        meta.unlink()
        meta.mkdir()


def run_pipeline(text: str, report: Callable[[str], None] = lambda stage: None) -> Outcome:
    """The pipeline in this process (no time limit): parse + verify, attach tensors, [save, corrupt, load,] build,
    forward."""
    stage = "parse"
    start = time.monotonic()

    def enter(s: str) -> None:
        nonlocal stage
        stage = s
        report(s)

    def done(status: str, exc: BaseException | None = None, note: str = "") -> Outcome:
        if exc is None:
            return Outcome(status, stage, message=note, seconds=time.monotonic() - start)
        try:
            msg = str(exc)
        except BaseException as e:  # noqa: BLE001  (a message that cannot be rendered is itself a finding)
            msg, status = f"<str() raised {type(e).__name__}>", "bad_message"
        return Outcome(status, _stage_of(exc, stage), type(exc).__name__, msg, seconds=time.monotonic() - start)

    gen = torch.Generator().manual_seed(0)
    call, bundle = _directive(text, "call"), _directive(text, "bundle")
    scratch = tempfile.mkdtemp(prefix="itnet-fuzz-bundle-") if bundle else ""
    try:
        prog = itc.parse(text)
        enter("attach")
        attach_tensors(prog, gen)
        if bundle:
            enter("save")
            prog.save(scratch)
            enter("corrupt")
            corrupt_bundle(Path(scratch), bundle)
            enter("load")
            prog = itc.load(scratch)
        enter("build")
        plan = _directive(text, "plan")
        mod = itc.build(prog, plan={"*": plan} if plan else None)
        for at in ("mid", "lo") if call == "twice" else (call if call in ("lo", "hi") else "mid",):
            enter("inputs")
            flat, why = make_inputs(prog, gen, at)
            if why:
                return Outcome("ok", "build", message=f"forward skipped: {why}", seconds=time.monotonic() - start)
            enter("forward")
            call_module(mod, prog, flat, call)
        return done("ok")
    except itc.ItnetError as e:
        out = done("itnet_error", e)
        if not out.message.strip() or len(out.message.splitlines()) > 1:
            out.status = "bad_message"
        return out
    except BaseException as e:  # noqa: BLE001  (SystemExit from builtins.exit, KeyboardInterrupt: all findings)
        return done("harness" if stage in ("attach", "inputs", "corrupt") else "exception", e)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


# -------------------------------------------------------------------------------------------------------- worker
_STAGE = ["idle"]
_EVENTS: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if _STAGE[0] == "idle":
        return
    if event.startswith(HOSTILE_EVENTS):
        _EVENTS.append(event)
    elif event in ("open", "compile") and args and CANARY_FILE in str(args[0]):
        _EVENTS.append(f"{event} {str(args[0])[:80]}")
    elif event == "exec" and args and CANARY_FILE in str(getattr(args[0], "co_consts", "")):
        _EVENTS.append("exec of code naming the canary")
    elif event == "import" and args and args[0] == CANARY_MODULE:
        _EVENTS.append(f"import {CANARY_MODULE}")


def _serve(conn: object, scratch: str) -> None:
    """The worker's loop: receive a text, run it, send ("stage", s) messages and finally ("done", Outcome)."""
    os.chdir(scratch)
    Path(scratch, f"{CANARY_MODULE}.py").write_text(f"open({CANARY_FILE!r}, 'w').close()\nclass T: pass\n")
    sys.path.insert(0, scratch)
    os.environ["ITNET_CACHE_DIR"] = os.path.join(scratch, "cache")
    null = os.open(os.devnull, os.O_RDWR)
    err = os.open(os.path.join(scratch, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for fd, to in ((0, null), (1, null), (2, err)):
        os.dup2(to, fd)
    # Python-level streams too: under pytest they are capture files shared with the parent, and torch logs to them.
    sys.stdin, sys.stdout, sys.stderr = open(0, closefd=False), open(1, "w", closefd=False), open(2, "w", closefd=False)
    logging.disable(logging.CRITICAL)
    import faulthandler

    faulthandler.enable()
    with contextlib.suppress(ValueError, OSError):
        vm = int(re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_HEADROOM, vm + MEMORY_HEADROOM))
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    sys.addaudithook(_audit)
    while True:
        try:
            text = conn.recv()
        except EOFError:
            os._exit(0)
        _EVENTS.clear()
        _STAGE[0] = "parse"
        if text == SLEEP:
            time.sleep(3600)
        if text == SELFTEST:
            _STAGE[0] = "forward"
            exec(compile(CODE, "<selftest>", "exec"))  # the detector must see what a payload would do
            __import__(CANARY_MODULE)
            out = Outcome("ok", "forward")
            _STAGE[0] = "idle"
            out.canary = ", ".join(dict.fromkeys(_EVENTS))
            sys.modules.pop(CANARY_MODULE, None)
            conn.send(("done", out))
            continue

        def report(stage: str) -> None:
            _STAGE[0] = stage
            conn.send(("stage", stage))

        out = run_pipeline(text, report)
        _STAGE[0] = "idle"
        out.canary = ", ".join(dict.fromkeys(_EVENTS))
        sys.modules.pop(CANARY_MODULE, None)
        conn.send(("done", out))


_FORK = threading.Lock()  # one fork at a time: a child forked while another thread of the parent forks is not safe


class Worker:
    """One forked process that runs texts one at a time; killed and restarted when a text exceeds the time limit."""

    def __init__(self, limit: float = TIME_LIMIT):
        self.limit = limit
        self.proc: multiprocessing.Process | None = None
        self.scratch = tempfile.mkdtemp(prefix="itnet-fuzz-")

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        with _FORK:
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_serve, args=(child, self.scratch), daemon=True)
            self.proc.start()
            child.close()

    def run(self, text: str) -> Outcome:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        start = time.monotonic()
        stage = "parse"
        out: Outcome | None = None
        try:
            self.conn.send(text)
            while out is None:
                left = start + self.limit - time.monotonic()
                if left <= 0 or not self.conn.poll(left):
                    self._kill()
                    out = Outcome("hang", stage, message=f"no result after {self.limit:g} s")
                    break
                kind, payload = self.conn.recv()
                if kind == "stage":
                    stage = payload
                else:
                    out = payload
        except (EOFError, OSError, BrokenPipeError):
            code = self._kill()
            tail = self._stderr_tail()
            out = Outcome("crash", stage, f"exit {code}", f"worker died (exit code {code}){tail}")
        canary = Path(self.scratch, CANARY_FILE)
        if canary.exists():
            canary.unlink()
            out.canary = ", ".join(filter(None, [out.canary, f"{CANARY_FILE} created"]))
        out.seconds = time.monotonic() - start
        return out

    def _stderr_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = [ln for ln in Path(self.scratch, "stderr").read_text(errors="replace").splitlines() if ln.strip()]
            if lines:
                return ": " + " | ".join(lines[-3:])[:400]
        return ""

    def _kill(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        code = self.proc.exitcode
        self.proc = None
        return code

    def close(self) -> None:
        self._kill()
        shutil.rmtree(self.scratch, ignore_errors=True)


def warm(seeds: dict[str, str]) -> dict[str, Outcome]:
    """Run every seed once in this process, so forked workers start with every import and cache already made."""
    return {name: run_pipeline(text) for name, text in seeds.items()}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-seeds"]:
        for p in write_seeds(sys.argv[2:]):
            print(f"{p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p}: {len(p.read_text())} chars")
    else:
        print("usage: python tests/fuzzing.py --write-seeds [name ...]")
