"""Canonical text form of a Program. This docstring is the grammar; ``parser.py`` reads exactly this.

    program  := "itir 1" NL { line NL }
    line     := symbol | signature | input | weight | node | output | comment
    symbol   := "symbol" NAME "in" "[" INT "," (INT | "inf") "]"
    signature:= "signature" ("in" | "out") JSON                     # pytree of the call / result
    input    := "input" VALUE ":" type
    weight   := ("param" | "buffer" | "const") VALUE ":" type "=" STRING      # key in weights.safetensors
    node     := outs "=" OP "(" [item {"," item}] ")" [attrs] ":" types ["@" STRING]   # @ module path
    outs     := VALUE {"," VALUE} | "_"                               # "_": the op returns nothing
    types    := type {"," type} | "none"
    item     := arg | NAME "=" arg                                    # keyword arguments after positionals
    attrs    := "{" NAME "=" arg {"," NAME "=" arg} "}"               # sorted by name; it.transform only
    output   := "output" [arg {"," arg}]
    arg      := VALUE | INT | FLOAT | "true" | "false" | "none" | STRING | "[" [arg {"," arg}] "]"
              | "dtype(" DTYPE ")" | "device(" STRING ")" | "layout(" NAME ")" | "memory_format(" NAME ")"
    type     := DTYPE "[" [expr {"," expr}] "]" | ("int" | "float" | "bool") ["(" expr ")"]
    VALUE    := "%" [A-Za-z0-9_.]+        OP := NAME {"." NAME}      comment := "#" ...
    DTYPE    := f64 | f32 | f16 | bf16 | i64 | i32 | i16 | i8 | u8 | b8 | c64 | c128
    expr     := a size expression over + - * / **, ( ), integers, symbols, floor ceiling Mod Max Min
    FLOAT    := Python's repr of a float (1.0, 1e-12, inf, -inf, nan)

Values are printed in definition order; every value is defined before use. Printing then parsing gives the same text.
"""

from __future__ import annotations

import json

import torch

from .core import Node, Program, Value
from .types import DTYPE_NAMES, Type


def print_program(prog: Program) -> str:
    lines = ["itir 1"]
    for name in sorted(prog.symbols):
        lo, hi = prog.symbols[name]
        lines.append(f"symbol {name} in [{lo}, {'inf' if hi is None else hi}]")
    if prog.in_spec is not None:
        lines.append("signature in " + json.dumps(prog.in_spec, separators=(",", ":"), sort_keys=True))
    if prog.out_spec is not None:
        lines.append("signature out " + json.dumps(prog.out_spec, separators=(",", ":"), sort_keys=True))
    for v in prog.inputs:
        lines.append(f"input %{v.name} : {v.type}")
    for w in prog.weights:
        lines.append(f"{w.kind} %{w.value.name} : {w.value.type} = {json.dumps(w.key)}")
    lines.extend(print_node(n) for n in prog.nodes)
    lines.append("output " + ", ".join(print_arg(a) for a in prog.outputs) if prog.outputs else "output")
    return "\n".join(lines) + "\n"


def print_node(node: Node) -> str:
    outs = ", ".join(f"%{v.name}" for v in node.outputs) or "_"
    items = [print_arg(a) for a in node.args]
    items += [f"{k}={print_arg(v)}" for k, v in node.kwargs.items()]
    text = f"{outs} = {node.op}({', '.join(items)})"
    if node.attrs is not None:
        attrs = node.attrs.to_dict()
        text += " {" + ", ".join(f"{k}={print_arg(attrs[k])}" for k in sorted(attrs)) + "}"
    text += " : " + (", ".join(print_type(v.type) for v in node.outputs) or "none")
    if node.layer:
        text += f" @{json.dumps(node.layer)}"
    return text


def print_type(t: Type) -> str:
    return str(t)


def print_arg(a: object) -> str:
    if isinstance(a, Value):
        return f"%{a.name}"
    if a is None:
        return "none"
    if isinstance(a, bool):
        return "true" if a else "false"
    if isinstance(a, int):
        return str(a)
    if isinstance(a, float):
        return repr(a)
    if isinstance(a, str):
        return json.dumps(a)
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(print_arg(x) for x in a) + "]"
    if isinstance(a, torch.dtype):
        return f"dtype({DTYPE_NAMES[a]})"
    if isinstance(a, torch.device):
        return f"device({json.dumps(str(a))})"
    if isinstance(a, torch.layout):
        return f"layout({str(a).removeprefix('torch.')})"
    if isinstance(a, torch.memory_format):
        return f"memory_format({str(a).removeprefix('torch.')})"
    raise TypeError(f"cannot print argument {a!r} of type {type(a).__name__}")
