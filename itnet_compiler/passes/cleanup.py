"""Dead-code elimination. Valid IR in, valid IR out; removes nodes none of whose results are used.

Ops with effects (asserts, range constraints, in-place ops) are kept even when nothing reads them.
"""

from __future__ import annotations

from ..ir.core import Program

_EFFECTFUL = ("_assert", "sym_constrain_range", "print", "copy_")


def is_effectful(op: str) -> bool:
    """Asserts, and in-place ATen ops (``add_``, ``index_put_``): their effect may matter with no reader."""
    name = op.split(".")[1] if op.count(".") >= 2 else op
    return any(tag in op for tag in _EFFECTFUL) or (name.endswith("_") and not name.startswith("_"))


def dce(prog: Program) -> Program:
    live = prog.output_ids()
    keep = []
    for node in reversed(prog.nodes):
        if is_effectful(node.op) or any(id(v) in live for v in node.outputs):
            keep.append(node)
            live |= {id(v) for v in node.input_values()}
    prog.nodes = keep[::-1]
    return prog
