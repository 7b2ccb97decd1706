"""Dead-code elimination. Valid IR in, valid IR out; removes nodes none of whose results are used.

Ops with effects are kept even when nothing reads them; the op's own schema says which: ATen ops whose schema
mutates an argument (``add_``, ``index_put_``, ``copy_``) and the ops torch.fx itself treats as side-effectful
(asserts, range constraints). An op that cannot be resolved is kept (the verifier or the backend names it).
"""

from __future__ import annotations

from functools import cache

import torch.fx.node

from ..ir.core import TRANSFORM, Program
from ..ir.ops import resolve_op


@cache
def is_effectful(op: str) -> bool:
    """Whether ``op`` has an effect beyond its results (from its schema), so that it stays without a reader."""
    if op == TRANSFORM:
        return False
    try:
        fn = resolve_op(op)
    except ValueError:
        return True
    if fn in getattr(torch.fx.node, "_side_effectful_functions", ()):
        return True
    schema = getattr(fn, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def dce(prog: Program) -> Program:
    live = prog.output_ids()
    keep = []
    for node in reversed(prog.nodes):
        if is_effectful(node.op) or any(v in live for v in node.outputs):
            keep.append(node)
            live |= set(node.input_values())
    prog.nodes = keep[::-1]
    return prog
