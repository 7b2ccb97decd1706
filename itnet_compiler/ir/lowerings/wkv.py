"""Lowering records of ``wkv`` (RWKV's WKV): ``scan`` and ``chunked``, both exact, with their cost rules.

``scan`` walks the sequence with the (numerator, denominator, maximum) state of each channel: 16 FLOPs per step and
channel, and k, v, the output and w, u moved once. ``chunked`` materialises, per chunk of T steps, the [T, T] matrix of
log-weights (decay × position plus k) for every channel, so its FLOPs grow by T per step, and its bytes by the
matrices written and read; between chunks only the state passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import sympy

from ..core import Node
from ..cost import Cost, nbytes, out_type, role
from ..fields import Options, option
from ..lowering import register_lowering
from ..wkv import WkvAttrs


@dataclass(frozen=True)
class WkvChunkedOptions(Options):
    """Dense within chunks (the decay matrix), the stabilised state passed between them."""

    lowering: ClassVar[str] = "chunked"
    chunk: int = option(32, "steps per chunk", lo=1, tune=(8, 256))
    budget: float = option(float(1 << 24), "most elements of the chunk matrices held at once", lo=1.0)


def _sizes(node: Node) -> tuple[sympy.Expr, sympy.Expr]:
    """(B·L·C, the bytes every lowering moves: k, v, w, u and the output once)."""
    a = node.attrs
    assert isinstance(a, WkvAttrs)
    k, v, w, u = (role(node, r) for r in ("k", "v", "w", "u"))
    assert k is not None and v is not None and w is not None and u is not None
    points = k.shape[0] * k.shape[1] * a.channels
    return points, nbytes(k) + nbytes(v) + nbytes(w) + nbytes(u) + nbytes(out_type(node))


@register_lowering("wkv", "scan", exact=True, doc="sequential in time, parallel over batch × channels")
def _(node, opts, tensors):
    points, io = _sizes(node)
    return Cost(16 * points, io, sympy.Integer(0))


@register_lowering(
    "wkv", "chunked", exact=True, options=WkvChunkedOptions, doc="dense [T, T] decay matrices per chunk, state between"
)
def _(node, opts, tensors):
    points, io = _sizes(node)
    t = sympy.Integer(opts.chunk)
    # per step: a row of T log-weights (add, max, exp, two multiply-adds), and the state update per chunk
    return Cost(6 * t * points + 16 * points, io + 2 * 4 * t * points, sympy.Integer(0))
