"""The native ITNet layer: a learnable MLP-kernel integral transform (the ``mlp`` family, ``ir/mlp.py``).

    y(x) = ∫ K_θ(x, x', u(x), u(x')) V u(x') dμ(x') + W_o u(x)

``IntegralTransform(dim, heads, hidden, features, normalize, measure, content, support, domain, lowering)`` on
sequences (``u`` [B, N, dim], coordinates = positions), 2-D grids (``u`` [B, H, W, dim], coordinates = (row, column))
or point sets (``u`` [B, N, dim] with ``coords`` [B, N, d_x] given); ``forward(u, coords, mask=..., weights=...)``
restricts the measure to the points a mask keeps (padded sets, padded batches) or weighs them (quadrature weights).
``content=False`` makes the kernel depend on the coordinates alone (a translation-invariant operator: convolutions,
state-space models), ``measure="counting"`` sums over the points instead of averaging. K_θ is an MLP over pair
features — the Hadamard product of projected points, the offset x − x', its squared length and random Fourier
features of it — whose first layer is split into per-point terms, so a pair costs O(hidden). The pair part lives
in ``MlpKernelCore``; ``itc.convert`` captures it as one ``mlp`` transform (the projections around it stay generic
ops), so the layer is planned, tuned, compiled and exported like every other transform; in eager PyTorch it runs
the torch lowering its ``lowering`` names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .backends.torch import mlp as _impl
from .errors import ItnetError
from .frontend.builtin_converters import bind_inputs
from .frontend.converters import register_converter
from .ir.lowering import LoweringSpec
from .ir.mlp import FEATURES, MlpAttrs

DOMAINS = ("sequence", "grid", "points")
_IMPL = {"dense": _impl.mlp_dense, "fused": _impl.mlp_fused, "montecarlo": _impl.mlp_montecarlo}


class MlpKernelCore(nn.Module):
    """The pair part: y = Σ_j w(i, j) v_j with K from the per-point terms and the kernel's own parameters."""

    def __init__(self, hidden: int, heads: int, coord_dim: int, features: tuple[str, ...], normalize: bool,
                 causal: bool, lowering: str, fourier_scale: float, seed: int, measure: str = "uniform"):  # fmt: skip
        super().__init__()
        self.hidden, self.heads, self.coord_dim = hidden, heads, coord_dim
        self.features, self.normalize, self.causal, self.measure = tuple(features), normalize, causal, measure
        self.lowering = LoweringSpec.parse(lowering) if isinstance(lowering, str) else lowering
        gen = torch.Generator().manual_seed(seed)
        self.w_off = nn.Parameter(torch.randn(hidden, coord_dim, generator=gen) * 0.1)
        self.w_dist = nn.Parameter(torch.zeros(hidden))
        # random Fourier features of the offset: fixed frequencies and phases, learned amplitudes
        self.register_buffer("omega", torch.randn(hidden, coord_dim, generator=gen) / fourier_scale)
        self.register_buffer("beta", torch.rand(hidden, generator=gen) * 2 * math.pi)
        self.alpha = nn.Parameter(torch.full((hidden,), 0.5))
        self.w_out = nn.Parameter(torch.randn(heads, hidden, generator=gen) / math.sqrt(hidden))
        self.b_out = nn.Parameter(torch.zeros(heads))

    def params(self) -> tuple[torch.Tensor, ...]:
        return self.w_off, self.w_dist, self.omega, self.beta, self.alpha, self.w_out, self.b_out

    def forward(self, a, b, rho, gamma, xq, xk, v, mu=None):
        name = self.lowering.name if self.lowering.name != "auto" else "fused"
        fn = _IMPL.get(name)
        if fn is None:
            raise ItnetError(f"the ITNet layer runs {sorted(_IMPL)} in eager PyTorch, not {name!r}; convert the "
                             "model and build it for other lowerings")  # fmt: skip
        opts = dict(self.lowering.options)
        measure = "importance" if mu is not None else self.measure
        return fn(a, b, rho, gamma, xq, xk, v, mu, *self.params(), normalize=self.normalize, causal=self.causal,
                  features=self.features, measure=measure, **opts)  # fmt: skip


class IntegralTransform(nn.Module):
    """y = Σ_j softmax_j K_θ(i, j) (V u)_j (``normalize=False``: Σ_j μ_j K_θ(i, j) (V u)_j) + W_o u, per head.

    ``measure``: ``uniform`` (μ_j = 1/M, or 1/count of the points a mask keeps) or ``counting`` (μ_j = 1).
    ``content=False``: K_θ sees the coordinates only (no Hadamard term, ρ a learned constant, γ = 0)."""

    def __init__(self, dim: int, heads: int = 4, hidden: int = 32, features: tuple[str, ...] = FEATURES,
                 normalize: bool = True, support: str = "full", domain: str = "sequence",
                 coord_dim: int | None = None, lowering: str = "auto", fourier_scale: float = 4.0,
                 coord_scale: float = 1.0, seed: int = 0, measure: str = "uniform",
                 content: bool = True):  # fmt: skip
        super().__init__()
        if dim % heads:
            raise ItnetError(f"IntegralTransform: dim {dim} must be a multiple of heads {heads}")
        if measure not in ("uniform", "counting"):
            raise ItnetError(f"IntegralTransform: measure is uniform or counting (weights go to forward), not "
                             f"{measure!r}")  # fmt: skip
        if not content and "hadamard" in features:
            raise ItnetError("IntegralTransform: content=False (a kernel of the coordinates only) takes no hadamard "
                             "feature; pass features among ('offset', 'dist2', 'fourier')")  # fmt: skip
        if not content and not any(f in features for f in ("offset", "dist2", "fourier")):
            raise ItnetError("IntegralTransform: content=False needs a coordinate feature (offset, dist2 or fourier)")
        if domain not in DOMAINS:
            raise ItnetError(f"IntegralTransform: domain must be one of {DOMAINS}, not {domain!r}")
        if support not in ("full", "causal") or (support == "causal" and domain != "sequence"):
            raise ItnetError("IntegralTransform: support is full, or causal on a sequence")
        bad = [f for f in features if f not in FEATURES]
        if bad or not features:
            raise ItnetError(f"IntegralTransform: features must be among {FEATURES}, not {tuple(features)}")
        dx = {"sequence": 1, "grid": 2}.get(domain, coord_dim)
        if dx is None or not 1 <= dx <= 8:
            raise ItnetError("IntegralTransform: a point-set domain needs coord_dim (1 to 8)")
        self.dim, self.heads, self.hidden, self.domain, self.coord_scale = dim, heads, hidden, domain, coord_scale
        self.content, self.measure = content, measure
        hadamard = "hadamard" in features
        self.proj_a = nn.Linear(dim, hidden, bias=False) if hadamard else None
        self.proj_b = nn.Linear(dim, hidden, bias=False) if hadamard else None
        self.proj_rho = nn.Linear(dim, hidden) if content else None
        self.proj_gamma = nn.Linear(dim, hidden, bias=False) if content else None
        self.rho_bias = None if content else nn.Parameter(torch.zeros(hidden))  # the first layer's bias alone
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.skip = nn.Linear(dim, dim, bias=False)  # W_o u(x)
        self.kernel = MlpKernelCore(hidden, heads, dx, tuple(features), normalize, support == "causal", lowering,
                                    fourier_scale, seed, measure)  # fmt: skip

    def coordinates(self, u: torch.Tensor) -> torch.Tensor:
        """[1, N, d_x] positions (sequence) or (row, column) (grid), times ``coord_scale``."""
        if self.domain == "sequence":
            pos = torch.arange(u.shape[1], dtype=u.dtype, device=u.device)[None, :, None]
        else:
            h, w = u.shape[1], u.shape[2]
            r = torch.arange(h, dtype=u.dtype, device=u.device)[:, None].expand(h, w)
            c = torch.arange(w, dtype=u.dtype, device=u.device)[None, :].expand(h, w)
            pos = torch.stack([r, c], -1).reshape(1, h * w, 2)
        return pos * self.coord_scale

    def forward(
        self,
        u: torch.Tensor,
        coords: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``u`` [B, N, dim] (grid [B, H, W, dim]); ``coords`` [B, N, d_x] for point sets; ``mask`` [B, N] (grid
        [B, H, W]) bool, True where a point is real: the others are outside the measure (every output still
        computed); ``weights`` [B, N] non-negative quadrature weights μ_j, used as given (times the mask)."""
        shape = u.shape
        if self.domain == "points":
            if (
                coords is None
                or coords.dim() != 3
                or coords.shape[1] != u.shape[1]
                or coords.shape[0] not in (1, u.shape[0])
            ):
                raise ItnetError("IntegralTransform: a point-set domain takes coords [batch or 1, points, coord_dim]")
            x = coords.to(u.dtype)
        else:
            if coords is not None:
                raise ItnetError(f"IntegralTransform: a {self.domain} domain makes its own coordinates")
            x = self.coordinates(u)
        if self.domain == "grid":
            if u.dim() != 4:
                raise ItnetError("IntegralTransform: a grid domain takes u [batch, height, width, dim]")
            u = u.reshape(shape[0], shape[1] * shape[2], shape[3])
        elif u.dim() != 3:
            raise ItnetError(f"IntegralTransform: a {self.domain} domain takes u [batch, points, dim]")
        bsz, n, _ = u.shape
        mu = self._measure(mask, weights, u, tuple(shape[:-1]))
        a = self.proj_a(u) if self.proj_a is not None else None
        b = self.proj_b(u) if self.proj_b is not None else None
        if self.content:
            rho, gamma = self.proj_rho(u), self.proj_gamma(u)
        else:  # batch 1: the kernel of the coordinates is shared by the batch, its pairs evaluated once
            rb = 1 if x.shape[0] == 1 else bsz
            rho = self.rho_bias.expand(rb, n, self.hidden)
            gamma = u.new_zeros(rb, n, self.hidden)
        v = self.value(u).reshape(bsz, n, self.heads, self.dim // self.heads).transpose(1, 2)
        y = self.kernel(a, b, rho, gamma, x, x, v, mu)
        y = self.out(y.transpose(1, 2).reshape(bsz, n, self.dim)) + self.skip(u)
        return y.reshape(shape) if self.domain == "grid" else y  # a fresh tensor, never a view of one

    def _measure(self, mask, weights, u, lead: tuple[int, ...]) -> torch.Tensor | None:
        """μ [B, N] for the importance measure, or None (the layer's own uniform or counting measure)."""
        if mask is None and weights is None:
            return None
        for name, t in (("mask", mask), ("weights", weights)):
            if t is not None and tuple(t.shape) != tuple(lead):
                raise ItnetError(f"IntegralTransform: {name} must be {list(lead)} (one entry per point), not "
                                 f"{list(t.shape)}")  # fmt: skip
        if mask is not None and mask.dtype != torch.bool:
            raise ItnetError("IntegralTransform: mask is a bool tensor (True where a point is real); pass float "
                             "weights as weights=")  # fmt: skip
        if weights is not None and not torch.compiler.is_compiling() and not bool((weights >= 0).all()):
            raise ItnetError("IntegralTransform: weights must be non-negative and not NaN (quadrature weights of a "
                             "measure; 0 removes a point)")  # fmt: skip
        bsz = u.shape[0]
        mu = None if weights is None else weights.to(u.dtype).reshape(bsz, -1)
        if mask is not None:
            keep = mask.reshape(bsz, -1).to(u.dtype)
            if mu is None and self.measure == "uniform":  # 1/count of the points kept, as 1/M without a mask
                mu = keep / keep.sum(-1, keepdim=True).clamp_min(1.0)
            else:
                mu = keep if mu is None else mu * keep
        return mu


def _shapes(module: MlpKernelCore, a, b, rho, gamma, xq, xk, v, mu=None):
    return v.new_empty(v.shape[0], v.shape[1], rho.shape[1], v.shape[3])


@register_converter(MlpKernelCore, shapes=_shapes)
def _convert(ctx, module: MlpKernelCore, *inputs):
    """The pair part as one ``mlp`` transform; the kernel's parameters become its weight inputs."""
    bound = bind_inputs(ctx, module, inputs)
    attrs = MlpAttrs(
        heads=module.heads,
        hidden=module.hidden,
        coord_dim=module.coord_dim,
        features=module.features,
        normalize=module.normalize,
        support="causal" if module.causal else "full",
        lowering=module.lowering,
        measure="importance" if bound.get("mu") is not None else module.measure,
    )
    roles = {r: bound[r] for r in ("a", "b", "rho", "gamma", "xq", "xk", "v", "mu") if bound.get(r) is not None}
    for name in ("w_off", "w_dist", "omega", "beta", "alpha", "w_out", "b_out"):
        roles[name] = ctx.weight(name)
    return ctx.transform(attrs, roles, ctx.output_types)
