"""The ``wkv`` family of ``it.transform``: RWKV's decayed, normalised causal kernel with a bonus on the diagonal.

Per channel c, with w the decay rate (a step multiplies the past by e^{-w}) and u the bonus of the current token:

    wkv_t = (Σ_{i<t} e^{-(t-1-i)·w + k_i} v_i + e^{u + k_t} v_t) / (Σ_{i<t} e^{-(t-1-i)·w + k_i} + e^{u + k_t})

that is K(t, i) = e^{-(t-1-i)·w + k_i} for i < t and e^{u + k_t} on the diagonal, normalised over i ≤ t: a causal
transform whose kernel reads k of the source point only, so it is a two-number state (numerator, denominator) scanned
over time. Every lowering keeps the state scaled by a running maximum of the log-weights (as transformers'
``rwkv_linear_attention_cpu``), so no e^{k} overflows.

Input layout (fixed by the converter, relied upon by every backend): ``k`` and ``v`` [B, L, C]; ``w`` and ``u`` [C]
(RWKV's ``exp(time_decay)`` and ``time_first``). Output [B, L, C] in k's dtype; arithmetic in float32 at least.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import sympy

from .families import FamilyAttrs, at_least, one_of, register_family, role_type

if TYPE_CHECKING:
    from .core import Node


@register_family
@dataclass(frozen=True, kw_only=True)
class WkvAttrs(FamilyAttrs):
    """RWKV's WKV: e^{-(t-1-i)w + k_i} for i < t, e^{u + k_t} at i = t, normalised over i ≤ t."""

    family: ClassVar[str] = "wkv"
    roles: ClassVar[tuple[str, ...]] = ("k", "v", "w", "u")
    channels: int = at_least(1, 1)
    normalize: bool = True
    support: str = one_of("causal")

    def check(self, node: Node) -> None:
        super().check(node)
        if self.support != "causal":
            raise ValueError(f"wkv support is causal, not {self.support!r}")
        if not self.normalize:
            raise ValueError("wkv is always normalised (numerator over denominator)")
        k, v, w, u = (role_type(node, r) for r in ("k", "v", "w", "u"))
        c = self.channels
        if k.rank != 3 or sympy.simplify(k.shape[2] - c) != 0:
            raise ValueError(f"k must be [batch, length, {c}], not {k}")
        if v.rank != 3 or any(sympy.simplify(a - b) != 0 for a, b in zip(v.shape, k.shape, strict=True)):
            raise ValueError(f"v must have k's shape {k}, not {v}")
        for role, t in (("w", w), ("u", u)):
            if t.rank != 1 or sympy.simplify(t.shape[0] - c) != 0:
                raise ValueError(f"{role} must be [{c}], not {t}")
        if len(node.outputs) != 1:
            raise ValueError("wkv has one output")

    def flops(self, node: Node) -> sympy.Expr:
        k = role_type(node, "k")
        # per step and channel: two maxima, four exponentials, two multiply-adds each for numerator and denominator
        return 16 * k.shape[0] * k.shape[1] * self.channels

    def domain(self, node: Node) -> str:
        return f"seq[{role_type(node, 'k').shape[1]}] causal"

    def params(self) -> str:
        return f"{self.channels} channels, decay e^-w per step, bonus e^u on the diagonal"
