"""Recurrent kernel families of ``it.transform``: ``ssm`` (state-space scans) and ``gated`` (LSTM, GRU, RNN).

Both are causal transforms whose kernel is a product of per-step transitions: for ``ssm`` the transition is diagonal
and does not read the state, so K(i, j) = C_iᵀ exp(Σ_{r=j+1..i} Δ_r A) Δ_j B_j is a closed form and admits scans,
chunked (SSD) and dense evaluation; for ``gated`` the gates read h_{t-1}, so the kernel exists only implicitly and
only a sequential scan (or torch's own RNN) computes it exactly.

Input layouts (fixed by the converters, relied upon by every backend):
- ``ssm``: ``x`` [B, L, H, P] (H heads of P channels); ``dt`` [B, L, H] (selective) or [H] (time-invariant);
  ``A`` [H, N] (diagonal, Mamba) or [H] (one scalar per head, Mamba2/SSD), real or complex (S4D); ``B`` and ``C``
  [B, L, G, N] (selective) or [G, N] (time-invariant), head h reading group h // (H / G); optional ``D`` [H] (skip
  y += D x), ``dt_bias`` [H], ``h0`` [B, H, P, N]. The step is h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t,
  y_t = C_tᵀ h_t (the real part when the state is complex), where Δ = clamp(softplus?(dt + dt_bias), dt_min,
  dt_max). Outputs: y [B, L, H, P] in x's dtype, and the final state [B, H, P, N] when ``return_state`` (float32 at
  least, complex when A is).
- ``gated``: one node per ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` module, every layer and direction inside it, so that
  the node is the module (plans, inspect rows and bundles name it by its module path) and ``library`` is torch's fused
  RNN. Roles:
  ``x`` [L, B, I] ([B, L, I] when ``batch_first``; [L, I] unbatched), ``weights`` the list torch keeps in
  ``_flat_weights`` (per layer, per direction: w_ih, w_hh, then b_ih, b_hh when ``bias``, then w_hr when
  ``proj_size``), optional ``h0`` [layers·dirs, B, H_out] and ``c0`` [layers·dirs, B, H] (LSTM). Outputs exactly as
  torch returns them: output, h_n and, for LSTM, c_n. Cells: ``lstm`` (gates i f g o), ``gru`` (r z n) and the
  one-gate Elman cells ``rnn_tanh`` / ``rnn_relu`` (h_t = act(x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import sympy

from .families import FamilyAttrs, at_least, one_of, register_family, role_type
from .types import TensorType

if TYPE_CHECKING:
    from .core import Node


# The cells of ``gated``, with torch's mode names (``nn.RNNBase.mode``) in lower case.
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def _same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return sympy.simplify(a - b) == 0


@register_family
@dataclass(frozen=True, kw_only=True)
class SsmAttrs(FamilyAttrs):
    """A diagonal (selective or time-invariant) state-space scan: Mamba, Mamba2 (SSD), S4/S4D in recurrent form."""

    family: ClassVar[str] = "ssm"
    roles: ClassVar[tuple[str, ...]] = ("x", "dt", "A", "B", "C", "D?", "dt_bias?", "h0?")
    state_size: int = at_least(16, 1)
    groups: int = at_least(1, 1)
    head_dim: int = at_least(1, 1)
    selective: bool = True
    dt_softplus: bool = False
    dt_min: float = -math.inf
    dt_max: float = math.inf
    # The chunk length the source model uses (Mamba2's chunk_size); ``chunked`` takes it unless the spec says otherwise.
    chunk: int = at_least(64, 1)
    return_state: bool = False
    support: str = one_of("causal")

    def check(self, node: Node) -> None:
        super().check(node)
        if self.support != "causal":
            raise ValueError(f"ssm support is causal, not {self.support!r}")
        x, dt, a = role_type(node, "x"), role_type(node, "dt"), role_type(node, "A")
        b, c = role_type(node, "B"), role_type(node, "C")
        h, p, n, g = self.heads, self.head_dim, self.state_size, self.groups
        if x.rank != 4 or not (_same(x.shape[2], h) and _same(x.shape[3], p)):
            raise ValueError(f"x must be [batch, length, {h}, {p}], not {x}")
        if h % g:
            raise ValueError(f"heads {h} is not a multiple of groups {g}")
        seq = x.shape[:2] if self.selective else ()
        want = {"dt": (*seq, h), "B": (*seq, g, n), "C": (*seq, g, n)}
        for role, t in (("dt", dt), ("B", b), ("C", c)):
            if t.rank != len(want[role]) or not all(_same(u, v) for u, v in zip(t.shape, want[role], strict=True)):
                kind = "selective" if self.selective else "time-invariant"
                raise ValueError(f"{role} of a {kind} ssm must be {list(want[role])}, not {t}")
        if a.rank not in (1, 2) or not _same(a.shape[0], h) or (a.rank == 2 and not _same(a.shape[1], n)):
            raise ValueError(f"A must be [{h}] or [{h}, {n}], not {a}")
        for role in ("D", "dt_bias"):
            if node.kwargs.get(role) is not None and role_type(node, role).rank != 1:
                raise ValueError(f"{role} must be [{h}]")
        if len(node.outputs) != (2 if self.return_state else 1):
            raise ValueError("ssm has one output, two when return_state")

    def flops(self, node: Node) -> sympy.Expr:
        x = role_type(node, "x")
        # per step and state element: decay·h + Δ·x·B, then the C contraction
        return 6 * x.shape[0] * x.shape[1] * self.heads * self.head_dim * self.state_size

    def domain(self, node: Node) -> str:
        return f"seq[{role_type(node, 'x').shape[1]}] causal"

    def params(self) -> str:
        parts = [f"state {self.heads}×{self.head_dim}×{self.state_size}"]
        if self.groups != 1:
            parts.append(f"groups {self.groups}")
        parts.append("selective" if self.selective else "time-invariant")
        if self.dt_softplus:
            parts.append("Δ softplus")
        return ", ".join(parts)


@register_family
@dataclass(frozen=True, kw_only=True)
class GatedAttrs(FamilyAttrs):
    """An ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` module: gates that read h_{t-1}, every layer and direction."""

    family: ClassVar[str] = "gated"
    roles: ClassVar[tuple[str, ...]] = ("x", "weights", "h0?", "c0?")
    cell: str = one_of(*CELLS)
    input_size: int = at_least(1, 1)
    hidden_size: int = at_least(1, 1)
    proj_size: int = 0
    num_layers: int = at_least(1, 1)
    bidirectional: bool = False
    batch_first: bool = False
    bias: bool = True
    support: str = one_of("causal", "full")

    @property
    def gates(self) -> int:
        return {"lstm": 4, "gru": 3}.get(self.cell, 1)

    @property
    def dirs(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def out_size(self) -> int:
        return self.proj_size or self.hidden_size

    def weight_shapes(self) -> list[tuple[int, ...]]:
        """The shape of every entry of ``weights``, in torch's ``_flat_weights`` order."""
        shapes: list[tuple[int, ...]] = []
        gh, h = self.gates * self.hidden_size, self.hidden_size
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else self.out_size * self.dirs
            for _ in range(self.dirs):
                shapes += [(gh, in_size), (gh, self.out_size)]
                shapes += [(gh,), (gh,)] if self.bias else []
                shapes += [(self.proj_size, h)] if self.proj_size else []
        return shapes

    def check(self, node: Node) -> None:
        super().check(node)
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, not {self.cell!r}")
        if self.support != ("full" if self.bidirectional else "causal"):
            raise ValueError("gated support is causal, full when bidirectional")
        if self.proj_size and (self.cell != "lstm" or self.proj_size >= self.hidden_size):
            raise ValueError("proj_size needs an lstm cell and must be smaller than hidden_size")
        if self.cell != "lstm" and node.kwargs.get("c0") is not None:
            raise ValueError(f"a {self.cell} cell has no cell state c0")
        x = role_type(node, "x")
        if x.rank not in (2, 3) or not _same(x.shape[-1], self.input_size):
            raise ValueError(f"x must be [length, batch, {self.input_size}] (or batch first, or unbatched), not {x}")
        batch = () if x.rank == 2 else (x.shape[0] if self.batch_first else x.shape[1],)
        for role, size in (("h0", self.out_size), ("c0", self.hidden_size)):
            want = (self.num_layers * self.dirs, *batch, size)
            t = role_type(node, role) if node.kwargs.get(role) is not None else None
            if t is not None and (t.rank != len(want) or not all(map(_same, t.shape, want))):
                raise ValueError(f"{role} must be {list(want)}, not {t}")
        weights = node.kwargs.get("weights")
        count = self.num_layers * self.dirs * (2 + 2 * self.bias + (self.proj_size > 0))
        if not isinstance(weights, (list, tuple)) or len(weights) != count:
            raise ValueError(f"weights must be a list of {count} tensors in torch's _flat_weights order")
        want = self.weight_shapes()
        for i, (w, shape) in enumerate(zip(weights, want, strict=True)):
            t = getattr(w, "type", None)
            if not isinstance(t, TensorType) or tuple(int(d) for d in t.shape) != shape:
                raise ValueError(f"weights[{i}] must be {list(shape)}, not {t}")
        outs = 3 if self.cell == "lstm" else 2
        if len(node.outputs) != outs:
            raise ValueError(f"a {self.cell} node has {outs} outputs (output, h_n{', c_n' if outs == 3 else ''})")

    def flops(self, node: Node) -> sympy.Expr:
        x = role_type(node, "x")
        steps = x.shape[0] * x.shape[1] if x.rank == 3 else x.shape[0]
        total = sympy.Integer(0)
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else self.out_size * self.dirs
            per = 2 * self.gates * self.hidden_size * (in_size + self.out_size)
            per += 2 * self.hidden_size * self.proj_size
            total += self.dirs * per
        return total * steps

    def domain(self, node: Node) -> str:
        x = role_type(node, "x")
        length = x.shape[1] if (self.batch_first and x.rank == 3) else x.shape[0]
        return f"seq[{length}] {'bidirectional' if self.bidirectional else 'causal'}"

    def params(self) -> str:
        state = f"{self.out_size}+{self.hidden_size}" if self.cell == "lstm" else f"{self.hidden_size}"
        parts = [f"{self.cell} {self.num_layers} layer{'s' if self.num_layers > 1 else ''} × {self.dirs} dir"]
        parts.append(f"hidden {self.hidden_size}")
        if self.proj_size:
            parts.append(f"proj {self.proj_size}")
        parts.append(f"state {state} per layer·dir")
        return ", ".join(parts)
