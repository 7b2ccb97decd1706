"""Kernel families of ``it.transform``: typed attribute records, registered by name.

Each family says which named inputs (roles) the node takes, checks its own attributes and shapes, and gives its
cost as a sympy expression in the program's symbolic sizes. Rules for a family live here, beside its attributes.

Input layouts (fixed by the recognisers, relied upon by every backend):
- ``stationary``: ``x`` [N, C_in, *spatial], ``weight`` as torch stores it ([C_out, C_in/g, *k], or [C_in, C_out/g, *k]
  when transposed), optional ``bias`` [C_out]. Output [N, C_out, *spatial_out].
- ``dot_exp``: ``q`` [B, H, L_q, D], ``k`` [B, H_kv, L_k, D], ``v`` [B, H_kv, L_k, D_v], optional ``mask``
  broadcastable to [B, H, L_q, L_k] (bool: keep where true; float: added to the logits). Output [B, H, L_q, D_v],
  and the normalised weights [B, H, L_q, L_k] as a second output when ``return_weights``. ``causal`` support is
  aligned top-left (row i sees columns j <= i), as ``F.scaled_dot_product_attention(is_causal=True)``; ``window(r)``
  support is the causal sliding window of r columns (i - r < j <= i, Mistral's and Gemma's local layers). A row that
  admits no column at all (fully masked) attends to nothing: its output is 0, as SDPA returns. Optional ``extras``
  (a list) are read by the ``score_mod`` expression (``ir/score_mod.py``); optional ``sinks`` [H] are attention
  sinks (gpt-oss): a per-head logit that joins every row's normalisation with a value of 0,
  y_i = Σ_j e^{s_ij} v_j / (e^{sink} + Σ_j e^{s_ij}).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import sympy
import torch

from . import score_mod
from .fields import INT_ATTR, MAX_STR_ATTR, at_least, check_fields, one_of
from .lowering import AUTO, LoweringSpec, check_lowering, parse_lowering
from .types import TensorType, numel

__all__ = ["INT_ATTR", "MAX_STR_ATTR", "at_least", "one_of", "parse_lowering"]

if TYPE_CHECKING:
    from .core import Node

FAMILIES: dict[str, type[FamilyAttrs]] = {}


def register_family(cls: type[FamilyAttrs]) -> type[FamilyAttrs]:
    FAMILIES[cls.family] = cls
    return cls


@dataclass(frozen=True, kw_only=True)
class FamilyAttrs:
    family: ClassVar[str]
    # Input roles in order; a trailing '?' marks an optional one.
    roles: ClassVar[tuple[str, ...]]
    lowering: LoweringSpec = LoweringSpec(AUTO)
    measure: str = one_of("uniform", "counting", "importance")
    normalize: bool = False
    support: str = "full"
    heads: int = at_least(1, 1)

    def __post_init__(self) -> None:
        """Every attribute has its declared type and range, whoever built the record (a pass, or hostile text):
        the verifier and every backend may then rely on them."""
        check_fields(self, lambda name: f"attribute {name} of family {self.family}")

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"family": self.family}
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if f.metadata.get("omit_default") and val == f.default:
                continue  # an attribute added later: absent from text written before it and from plain nodes
            out[f.name] = str(val) if isinstance(val, LoweringSpec) else _listify(val)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> FamilyAttrs:
        data = dict(data)
        data.pop("family", None)
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(names)
        if unknown:
            raise ValueError(f"unknown attribute(s) {sorted(unknown)} for family {cls.family}")
        return cls(**{k: _tuplify(v) for k, v in data.items()})

    def replace(self, **changes: object) -> FamilyAttrs:
        return dataclasses.replace(self, **changes)

    def check(self, node: Node) -> None:
        check_lowering(self)

    def admits(self, lowering: str) -> str | None:
        """Why this node cannot take ``lowering`` (a name) whatever its record says, or None. Rules that belong to
        one lowering live in its record (``Lowering.admits``)."""
        return None

    def flops(self, node: Node) -> sympy.Expr:
        raise NotImplementedError

    def domain(self, node: Node) -> str:
        raise NotImplementedError

    def params(self) -> str:
        """A short human summary of the kernel parameters for ``itnet inspect``."""
        return ""


def _listify(val: object) -> object:
    if isinstance(val, tuple):
        return [_listify(v) for v in val]
    return val


def _tuplify(val: object) -> object:
    if isinstance(val, list):
        return tuple(_tuplify(v) for v in val)
    return val


def role_type(node: Node, role: str) -> TensorType:
    v = node.kwargs.get(role)
    if v is None or not isinstance(getattr(v, "type", None), TensorType):
        raise ValueError(f"input '{role}' must be a tensor value")
    return v.type


@register_family
@dataclass(frozen=True, kw_only=True)
class StationaryAttrs(FamilyAttrs):
    """K(i, j) = W[offset(i, j)]: every convolution. ``padding`` holds (low, high) per spatial dim."""

    family: ClassVar[str] = "stationary"
    roles: ClassVar[tuple[str, ...]] = ("x", "weight", "bias?")
    rank: int = at_least(2, 1, 3)
    stride: tuple[int, ...] = at_least((1, 1), 1)  # type: ignore[assignment]
    # Negative entries crop (a folded F.pad may crop).
    padding: tuple[tuple[int, int], ...] = at_least(((0, 0), (0, 0)), -INT_ATTR[1])  # type: ignore[assignment]
    dilation: tuple[int, ...] = at_least((1, 1), 1)  # type: ignore[assignment]
    groups: int = at_least(1, 1)
    transposed: bool = False
    output_padding: tuple[int, ...] = at_least((0, 0), 0)  # type: ignore[assignment]
    padding_mode: str = one_of("zeros", "reflect", "replicate", "circular")
    measure: str = one_of("counting", "uniform", "importance")
    support: str = one_of("grid")

    def check(self, node: Node) -> None:
        super().check(node)
        r = self.rank
        if r not in (1, 2, 3):
            raise ValueError(f"rank must be 1, 2 or 3, not {r}")
        for fname in ("stride", "dilation", "output_padding"):
            if len(getattr(self, fname)) != r:
                raise ValueError(f"{fname} must have {r} entries")
        if len(self.padding) != r or any(len(p) != 2 for p in self.padding):
            raise ValueError(f"padding must be {r} (low, high) pairs")
        if self.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown padding_mode {self.padding_mode!r}")
        if self.transposed and self.padding_mode != "zeros":
            raise ValueError("transposed convolution supports only zeros padding")
        x, w = role_type(node, "x"), role_type(node, "weight")
        if x.rank != r + 2 or w.rank != r + 2:
            raise ValueError(f"x and weight must have rank {r + 2}")
        cin = w.shape[0] if self.transposed else w.shape[1] * self.groups
        if sympy.simplify(x.shape[1] - cin) != 0:
            raise ValueError(f"x has {x.shape[1]} channels but the weight expects {cin}")

    def out_channels(self, node: Node) -> sympy.Expr:
        w = role_type(node, "weight")
        return w.shape[1] * self.groups if self.transposed else w.shape[0]

    def flops(self, node: Node) -> sympy.Expr:
        x, w = role_type(node, "x"), role_type(node, "weight")
        out = node.outputs[0].type
        assert isinstance(out, TensorType)
        taps = numel(TensorType(w.dtype, w.shape[2:]))
        if self.transposed:
            return 2 * numel(x) * (w.shape[1]) * taps
        return 2 * numel(out) * w.shape[1] * taps

    def domain(self, node: Node) -> str:
        x = role_type(node, "x")
        out = node.outputs[0].type
        assert isinstance(out, TensorType)
        grid = "×".join(str(d) for d in x.shape[2:])
        grid_out = "×".join(str(d) for d in out.shape[2:])
        return f"grid{self.rank}d[{grid}]→[{grid_out}]"

    def params(self) -> str:
        w = "×".join(str(s) for s in self.stride)
        d = "×".join(str(s) for s in self.dilation)
        parts = [f"stride {w}", f"dilation {d}"]
        if self.groups != 1:
            parts.append(f"groups {self.groups}")
        if self.transposed:
            parts.append("transposed")
        if self.padding_mode != "zeros":
            parts.append(f"pad {self.padding_mode}")
        return ", ".join(parts)


_WINDOW = re.compile(r"window\(([1-9][0-9]*)\)")


@register_family
@dataclass(frozen=True, kw_only=True)
class DotExpAttrs(FamilyAttrs):
    """K(i, j) = exp(scale·⟨q_i, k_j⟩ + b(i, j)), normalised over j: every softmax attention."""

    family: ClassVar[str] = "dot_exp"
    roles: ClassVar[tuple[str, ...]] = ("q", "k", "v", "mask?", "extras?", "sinks?")
    scale: float = 1.0
    # m(s, b, h, i, j, t0..): the score modification between scale·⟨q, k⟩ and the mask (ir/score_mod.py); "" = s.
    score_mod: str = dataclasses.field(default="", metadata={"omit_default": True})
    # a ``sinks`` input [H]: per-head logits in every row's normalisation with a zero value (gpt-oss)
    has_sinks: bool = dataclasses.field(default=False, metadata={"omit_default": True})
    kv_heads: int = at_least(1, 1)
    mask: str = one_of("none", "bool", "additive")
    return_weights: bool = False
    normalize: bool = True

    @property
    def causal(self) -> bool:
        """Row i sees no column j > i (top-left aligned, as SDPA's is_causal): causal and window supports."""
        return self.support != "full"

    @property
    def window(self) -> int:
        """r of a ``window(r)`` support (row i sees the r columns i - r < j <= i, a sliding window); 0 otherwise."""
        m = _WINDOW.fullmatch(self.support)
        return int(m.group(1)) if m else 0

    def window_pairs(self, lq: sympy.Expr) -> sympy.Expr:
        """(i, j) pairs a window(r) support admits over L_q rows: Σ_i min(i + 1, r) = m·L_q - m(m-1)/2, m = min(r, L_q)
        (top-left aligned, L_k >= L_q)."""
        m = sympy.Min(self.window, lq)
        return m * lq - m * (m - 1) / 2

    def check(self, node: Node) -> None:
        super().check(node)
        if self.support not in ("full", "causal") and not self.window:
            raise ValueError(f"support must be full, causal or window(r) with r >= 1, not {self.support!r}")
        if not self.normalize:
            raise ValueError("dot_exp is always normalised (softmax)")
        q, k, v = (role_type(node, r) for r in ("q", "k", "v"))
        if q.rank != 4 or k.rank != 4 or v.rank != 4:
            raise ValueError("q, k and v must be [batch, heads, length, dim]")
        if q.shape[1] != self.heads or k.shape[1] != self.kv_heads or v.shape[1] != self.kv_heads:
            raise ValueError(f"heads {self.heads}/{self.kv_heads} do not match q {q} and k {k}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if sympy.simplify(q.shape[3] - k.shape[3]) != 0 or sympy.simplify(k.shape[2] - v.shape[2]) != 0:
            raise ValueError(f"q {q}, k {k} and v {v} do not agree on head dim or length")
        self._check_mod(node)
        sinks = node.kwargs.get("sinks")
        if (sinks is not None) != self.has_sinks:
            raise ValueError("has_sinks must say whether the node has a sinks input")
        if sinks is not None:
            st = getattr(sinks, "type", None)
            if not isinstance(st, TensorType) or st.rank != 1 or sympy.simplify(st.shape[0] - self.heads) != 0:
                raise ValueError(f"sinks must be [{self.heads}] (one logit per head), not {st}")
        has_mask = node.kwargs.get("mask") is not None
        if has_mask != (self.mask != "none"):
            raise ValueError(f"mask attribute {self.mask!r} does not match the mask input")
        if len(node.outputs) != (2 if self.return_weights else 1):
            raise ValueError("dot_exp has one output, two when return_weights")

    def _check_mod(self, node: Node) -> None:
        """The expression parses, reads only the node's extras (booleans where it uses them as conditions), and
        each extra broadcasts to [B, H, L_q, L_k]."""
        extras = node.kwargs.get("extras")
        if extras is None:
            extras = []
        if not isinstance(extras, (list, tuple)) or len(extras) > score_mod.MAX_EXTRAS:
            raise ValueError(f"extras must be a list of at most {score_mod.MAX_EXTRAS} tensors")
        if not self.score_mod:
            if extras:
                raise ValueError("extras inputs need a score_mod expression that reads them")
            return
        expr = score_mod.parse(self.score_mod)
        score_mod.check(expr, len(extras))
        q, k = role_type(node, "q"), role_type(node, "k")
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        conds = score_mod.conditions(expr)
        for n, t in enumerate(extras):
            tt = getattr(t, "type", None)
            if not isinstance(tt, TensorType) or tt.rank > 4:
                raise ValueError(f"extras[{n}] must be a tensor of rank at most 4")
            pairs = zip(reversed(tt.shape), reversed(full), strict=False)
            if any(d != 1 and sympy.simplify(d - f) != 0 for d, f in pairs):
                raise ValueError(f"extras[{n}] {tt} does not broadcast to [batch, heads, L_q, L_k]")
            if (tt.dtype == torch.bool) != (n in conds):
                raise ValueError(f"extras[{n}] must be boolean exactly when it is a where() condition")

    def flops(self, node: Node) -> sympy.Expr:
        q, v = role_type(node, "q"), role_type(node, "v")
        b, h, lq, d = q.shape
        lk, dv = v.shape[2], v.shape[3]
        per_pair = d + dv + (sympy.Rational(score_mod.ops(score_mod.parse(self.score_mod)), 2) if self.score_mod else 0)
        if self.window:
            return 2 * b * h * self.window_pairs(lq) * per_pair
        full = 2 * b * h * lq * lk * per_pair
        return full / 2 if self.causal else full

    def domain(self, node: Node) -> str:
        q, k = role_type(node, "q"), role_type(node, "k")
        return f"seq[{q.shape[2]}]←seq[{k.shape[2]}]"

    def params(self) -> str:
        parts = [f"scale {self.scale:.4g}"]
        if self.window:
            parts.append(f"sliding window {self.window}")
        if self.kv_heads != self.heads:
            parts.append(f"GQA kv_heads {self.kv_heads}")
        if self.mask != "none":
            parts.append(f"{self.mask} mask")
        if self.score_mod:
            parts.append(f"score {self.score_mod}")
        if self.has_sinks:
            parts.append("attention sinks")
        return ", ".join(parts)
