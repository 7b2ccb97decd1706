"""The ``mlp`` family of ``it.transform``: the native ITNet layer, a learnable MLP kernel over pair features.

    z_ijk = a_ik·b_jk + ρ_ik + γ_jk + Σ_d W_off[k, d]·δ_ijd + w_dist[k]·‖δ_ij‖² + α_k·cos(⟨ω_k, δ_ij⟩ + β_k)
    K_h(i, j) = Σ_k W_out[h, k]·silu(z_ijk) + b_out[h]                 δ_ij = x_i − x'_j (coordinates)

The first layer of the MLP is split into per-point terms (a = A u_i, b = B u_j for the Hadamard feature, ρ = C u_i
+ bias and γ = D u_j, computed once per point by generic ops), so that what is left per pair costs O(hidden):
one product, the offset terms over the coordinate dims, one cosine per hidden unit (random Fourier features of the
offset with learned amplitudes α), the activation and the output layer. The measure μ weighs the input points:
``uniform`` μ_j = 1/M (the integral over a domain of unit size, M points), ``counting`` μ_j = 1 (a plain sum: what a
convolution or a state-space model computes), ``importance`` μ_j given as the input ``mu`` [B|1, M] (quadrature weights
of an irregular point set; 0 removes a point, e.g. padding). Normalised, y_i = Σ_j μ_j e^{K(i, j)} v_j / Σ_j μ_j
e^{K(i, j)} over the support S(i) (softmax weights, like attention; uniform and counting coincide); otherwise
y_i = Σ_{j∈S(i)} μ_j K(i, j) v_j. A row whose support holds no point of positive weight gives 0.

Input layout (fixed by ``itnet_compiler.nn.IntegralTransform``, relied upon by every backend): ``a``, ``rho``
[B|1, N, H_d] and ``b``, ``gamma`` [B|1, M, H_d] (batch 1: one kernel shared by the batch, as a kernel of the
coordinates alone is) (``a`` and ``b`` absent without the Hadamard feature); ``xq`` [B|1, N, d_x]
and ``xk`` [B|1, M, d_x]; ``v`` [B, heads, M, d_v]; ``mu`` [B|1, M] (importance measure only); the kernel's own
parameters ``w_off`` [H_d, d_x], ``w_dist`` [H_d], ``omega`` [H_d, d_x], ``beta`` [H_d], ``alpha`` [H_d], ``w_out``
[heads, H_d], ``b_out`` [heads]. Output [B, heads, N, d_v]. ``causal`` support (sequences) keeps j ≤ i.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import sympy

from .families import FamilyAttrs, at_least, one_of, register_family, role_type

if TYPE_CHECKING:
    from .core import Node

FEATURES = ("hadamard", "offset", "dist2", "fourier")


@register_family
@dataclass(frozen=True, kw_only=True)
class MlpAttrs(FamilyAttrs):
    """K_h(i, j) = W_out silu(first layer of pair features) + b_out: the learnable kernel of ITNet."""

    family: ClassVar[str] = "mlp"
    roles: ClassVar[tuple[str, ...]] = ("a?", "b?", "rho", "gamma", "xq", "xk", "v", "mu?", "w_off", "w_dist",
                                        "omega", "beta", "alpha", "w_out", "b_out")  # fmt: skip
    hidden: int = at_least(32, 1, 4096)
    coord_dim: int = at_least(1, 1, 8)
    features: tuple[str, ...] = field(default=FEATURES)
    normalize: bool = True
    support: str = one_of("full", "causal")
    measure: str = one_of("uniform", "counting", "importance")

    @property
    def causal(self) -> bool:
        return self.support == "causal"

    def check(self, node: Node) -> None:
        super().check(node)
        if not self.features or len(set(self.features)) != len(self.features):
            raise ValueError(f"features must be distinct names among {FEATURES}, not {self.features}")
        bad = [f for f in self.features if f not in FEATURES]
        if bad:
            raise ValueError(f"unknown feature(s) {bad}; features are {FEATURES}")
        hd, dx, heads = self.hidden, self.coord_dim, self.heads
        hadamard = "hadamard" in self.features
        if (node.kwargs.get("a") is not None) != hadamard or (node.kwargs.get("b") is not None) != hadamard:
            raise ValueError("inputs a and b are present exactly when the hadamard feature is")
        rho, gamma, xq, xk, v = (role_type(node, r) for r in ("rho", "gamma", "xq", "xk", "v"))
        if rho.rank != 3 or gamma.rank != 3 or not _eq(rho.shape[2], hd) or not _eq(gamma.shape[2], hd):
            raise ValueError(f"rho and gamma must be [batch, points, {hd}], not {rho} and {gamma}")
        if v.rank != 4 or not _eq(v.shape[1], heads) or not _eq(v.shape[2], gamma.shape[1]):
            raise ValueError(f"v must be [batch, {heads}, {gamma.shape[1]}, d_v], not {v}")
        for role, n in (("xq", rho.shape[1]), ("xk", gamma.shape[1])):
            t = role_type(node, role)
            if t.rank != 3 or not _eq(t.shape[1], n) or not _eq(t.shape[2], dx):
                raise ValueError(f"{role} must be [batch or 1, {n}, {dx}], not {t}")
        if hadamard:
            for role, like in (("a", rho), ("b", gamma)):
                t = role_type(node, role)
                if t.rank != 3 or any(not _eq(x, y) for x, y in zip(t.shape, like.shape, strict=True)):
                    raise ValueError(f"{role} must have the shape {like}, not {t}")
        want = {"w_off": (hd, dx), "w_dist": (hd,), "omega": (hd, dx), "beta": (hd,), "alpha": (hd,),
                "w_out": (heads, hd), "b_out": (heads,)}  # fmt: skip
        for role, shape in want.items():
            t = role_type(node, role)
            if tuple(t.shape) != tuple(sympy.Integer(s) for s in shape):
                raise ValueError(f"{role} must be {list(shape)}, not {t}")
        if self.support == "causal" and not _eq(rho.shape[1], gamma.shape[1]):
            raise ValueError("a causal mlp transform maps a sequence to itself (as many outputs as inputs)")
        if (node.kwargs.get("mu") is not None) != (self.measure == "importance"):
            raise ValueError("the input mu (point weights) is present exactly when the measure is importance")
        if self.measure == "importance":
            mu = role_type(node, "mu")
            if mu.rank != 2 or not _eq(mu.shape[1], gamma.shape[1]):
                raise ValueError(f"mu must be [batch or 1, {gamma.shape[1]}], not {mu}")
        if len(node.outputs) != 1:
            raise ValueError("mlp has one output")

    def pair_flops(self) -> int:
        """FLOPs per (i, j) pair and head-independent hidden unit, plus the output layer per head."""
        per_unit = 2 * ("hadamard" in self.features) + 3  # a·b, + ρ + γ, activation
        per_unit += 4 * self.coord_dim * ("offset" in self.features or "dist2" in self.features)
        per_unit += (2 * self.coord_dim + 6) * ("fourier" in self.features)
        return self.hidden * (per_unit + 2 * self.heads)

    def flops(self, node: Node) -> sympy.Expr:
        rho, gamma, v = (role_type(node, r) for r in ("rho", "gamma", "v"))
        pairs = rho.shape[0] * rho.shape[1] * gamma.shape[1]
        pairs = pairs / 2 if self.causal else pairs
        return pairs * (self.pair_flops() + 2 * self.heads * v.shape[3])

    def domain(self, node: Node) -> str:
        rho, gamma = role_type(node, "rho"), role_type(node, "gamma")
        kind = "seq" if self.coord_dim == 1 else f"points{self.coord_dim}d"
        return f"{kind}[{rho.shape[1]}]←{kind}[{gamma.shape[1]}]"

    def params(self) -> str:
        parts = [f"hidden {self.hidden}", "+".join(self.features)]
        norm = "softmax-normalised" if self.normalize else "unnormalised"
        parts.append(f"{norm}, {self.measure} measure")
        return ", ".join(parts)


def _eq(a: sympy.Expr, b: object) -> bool:
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0
