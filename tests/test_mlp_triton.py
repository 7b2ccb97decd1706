"""The ``mlp`` family's Triton ``fused`` kernels (the ITNet layer) through the interpreter: forward and the gradients of
every input and kernel parameter against torch autograd on ``mlp_dense`` in float64, over normalised and uniform-measure
kernels, causal and full supports, feature subsets, lengths off the tile, rows ≠ columns, hidden widths, heads and
broadcast coordinates; float64 and float16 kernels; the generated source as a snapshot; and ``IntegralTransform``
models built for the Triton backend (no fallback) against eager, values and parameter gradients."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import hypothesis  # noqa: E402,F401  (loaded up front: the Triton interpreter walks module members)
import pytest  # noqa: E402
import torch  # noqa: E402
from snapshots import assert_matches_golden  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.backends.torch.mlp import mlp_dense  # noqa: E402
from itnet_compiler.backends.triton import loader, templates  # noqa: E402
from itnet_compiler.backends.triton import mlp as triton_mlp  # noqa: E402
from itnet_compiler.backends.triton.mlp import mlp_fused  # noqa: E402
from itnet_compiler.nn import IntegralTransform  # noqa: E402

DEVICE = "cuda" if os.environ.get("ITNET_TEST_GPU") else "cpu"
ALL = ("hadamard", "offset", "dist2", "fourier")
NO_HADAMARD = ("offset", "dist2", "fourier")
OFFSET_FOURIER = ("offset", "fourier")
ROLES = ("a", "b", "rho", "gamma", "xq", "xk", "v", "mu", "w_off", "w_dist", "omega", "beta", "alpha", "w_out", "b_out")


def inputs(n, m, hidden, heads, features, xbatch, coord_dim=1, batch=2, dv=16, seed=0) -> dict[str, torch.Tensor]:
    """Random inputs in float64; coordinates spread 3/coord_dim, so ‖δ‖² stays moderate and the float32 problem well
    conditioned (at 3 per dim in 2-d, torch's own float32 dense lowering is 3e-5 off in dρ)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    t = {"a": r(batch, n, hidden), "b": r(batch, m, hidden), "rho": r(batch, n, hidden), "gamma": r(batch, m, hidden),
         "xq": r(xbatch, n, coord_dim, scale=3.0 / coord_dim), "xk": r(xbatch, m, coord_dim, scale=3.0 / coord_dim),
         "v": r(batch, heads, m, dv), "w_off": r(hidden, coord_dim, scale=0.3), "w_dist": r(hidden, scale=0.1),
         "omega": r(hidden, coord_dim), "beta": r(hidden), "alpha": r(hidden),
         "w_out": r(heads, hidden, scale=hidden**-0.5), "b_out": r(heads), "mu": None}  # fmt: skip
    if "hadamard" not in features:
        t["a"] = t["b"] = None
    return t


def run(fn, t: dict, dtype: torch.dtype, device: str = "cpu", **static) -> tuple[torch.Tensor, dict]:
    """The output and the gradient of every present input for one fixed cotangent."""
    leaves = {k: None if x is None else x.to(device, dtype).requires_grad_() for k, x in t.items()}
    out = fn(*(leaves[r] for r in ROLES), **static)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device, dtype)
    names = [k for k in ROLES if leaves[k] is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in names], cot, allow_unused=True)
    return out, dict(zip(names, grads, strict=True))


def used(features: tuple[str, ...]) -> set[str]:
    """The inputs K depends on (the others have no gradient)."""
    out = {"rho", "gamma", "v", "w_out", "b_out"}
    out |= {"a", "b"} if "hadamard" in features else set()
    out |= {"xq", "xk"} if set(features) - {"hadamard"} else set()
    out |= {"w_off"} if "offset" in features else set()
    out |= {"w_dist"} if "dist2" in features else set()
    out |= {"omega", "beta", "alpha"} if "fourier" in features else set()
    return out


def errors(got: tuple, want: tuple, features) -> dict[str, float]:
    """Norm-relative error of the output and each gradient. A gradient that is zero analytically (the reference's is
    below 1e-9 of dV's: through the logits where a softmax has one term, a row of M = 1 or the first causal row, and a
    normalised kernel's b_out, which shifts a row's logits alike) is measured against dV's norm instead: float32 leaves
    a rounding residue there (dP − Δ cancels)."""
    (o1, g1), (o2, g2) = got, want
    out = {"out": ((o1.double() - o2).norm() / o2.norm()).item()}
    for name in used(features):
        assert g1[name] is not None and g2[name] is not None, name
        scale = g2[name].norm()
        scale = scale if scale > 1e-9 * g2["v"].norm() else g2["v"].norm()
        out[name] = ((g1[name].double() - g2[name]).norm() / scale.clamp_min(1e-30)).item()
    for name in set(g1) - used(features) - {"mu"}:  # μ's gradient: the importance-measure test
        assert g1[name] is None, f"{name} has no gradient (K does not read it)"
    return out


# normalize, causal, features, n, m, hidden, heads, xq/xk batch, coord dim
CASES = [
    (True, False, ALL, 13, 13, 8, 3, 1, 1),
    (True, True, ALL, 40, 40, 8, 1, 2, 1),
    (False, False, ALL, 13, 13, 32, 1, 2, 1),
    (False, True, ALL, 40, 40, 8, 3, 1, 1),
    (True, False, NO_HADAMARD, 9, 17, 8, 3, 2, 1),
    (False, False, OFFSET_FOURIER, 9, 17, 8, 1, 1, 1),
    (True, True, OFFSET_FOURIER, 13, 13, 32, 3, 2, 1),
    (False, True, NO_HADAMARD, 13, 13, 8, 1, 1, 1),
    (True, True, NO_HADAMARD, 1, 1, 8, 1, 2, 1),
    (False, False, ALL, 1, 17, 8, 3, 2, 1),
    (True, False, ALL, 17, 1, 32, 1, 1, 1),
    (True, False, ALL, 13, 20, 8, 1, 2, 2),
    (False, True, ALL, 17, 17, 8, 3, 1, 3),
]


def _id(c) -> str:
    norm, causal, feats, n, m, hd, h, xb, dx = c
    return (f"{'softmax' if norm else 'measure'}-{'causal' if causal else 'full'}-{'+'.join(f[:3] for f in feats)}"
            f"-N{n}-M{m}-H{hd}-h{h}-xb{xb}-dx{dx}")  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fused_kernel_forward_and_every_gradient_match_dense_in_float64(case) -> None:
    normalize, causal, features, n, m, hidden, heads, xbatch, dx = case
    t = inputs(n, m, hidden, heads, features, xbatch, dx)
    static = dict(normalize=normalize, causal=causal, features=features)
    got = run(mlp_fused, t, torch.float32, DEVICE, **static)
    want = run(mlp_dense, t, torch.float64, **static)
    assert got[0].dtype == torch.float32 and got[0].shape == want[0].shape
    err = errors(got, want, features)
    assert max(err.values()) <= 1e-5, err


@pytest.mark.parametrize("normalize", [True, False])
def test_a_float64_kernel_matches_to_float64_rounding(normalize) -> None:
    t = inputs(13, 13, 8, 2, ALL, 1)
    static = dict(normalize=normalize, causal=True, features=ALL)
    err = errors(run(mlp_fused, t, torch.float64, DEVICE, **static), run(mlp_dense, t, torch.float64, **static), ALL)
    assert max(err.values()) <= 1e-11, err


@pytest.mark.parametrize("normalize", [True, False])
def test_a_float16_kernel_is_close(normalize) -> None:
    t = inputs(20, 20, 16, 2, ALL, 1)
    static = dict(normalize=normalize, causal=False, features=ALL)
    got = run(mlp_fused, t, torch.float16, DEVICE, **static)
    assert got[0].dtype == torch.float16
    err = errors(got, run(mlp_dense, t, torch.float64, **static), ALL)
    assert max(err.values()) <= 2e-2, err


def test_tile_options_do_not_change_the_answer() -> None:
    t = inputs(40, 40, 8, 1, ALL, 1)
    static = dict(normalize=True, causal=True, features=ALL)
    base = run(mlp_fused, t, torch.float64, DEVICE, **static)
    tiles = dict(block_m=32, block_n=16, bwd_block_m=16, bwd_block_n=32, block_q=8, block_k=8)
    other = run(mlp_fused, t, torch.float64, DEVICE, **static, **tiles)
    assert max(errors(other, base, ALL).values()) <= 1e-12


# normalize, causal, mu batch (1: one set of weights shared by the batch)
WEIGHTED = [(True, False, 2), (True, True, 1), (False, False, 1), (False, True, 2)]


@pytest.mark.parametrize(
    "case", WEIGHTED, ids=lambda c: f"{'softmax' if c[0] else 'sum'}-{'causal' if c[1] else 'full'}-mub{c[2]}"
)
def test_importance_measure_forward_and_every_gradient_incl_the_weights_match_dense(case) -> None:
    """μ_j weighs column j (log μ in the softmax, a factor otherwise); ∂L/∂μ is the kernel's too."""
    normalize, causal, mub = case
    t = inputs(21, 21, 8, 3, ALL, 1)
    t["mu"] = torch.rand(mub, 21, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.05
    static = dict(normalize=normalize, causal=causal, features=ALL, measure="importance")
    got = run(mlp_fused, t, torch.float32, DEVICE, **static)
    want = run(mlp_dense, t, torch.float64, **static)
    err = errors(got, want, ALL)
    err["mu"] = ((got[1]["mu"].double() - want[1]["mu"]).norm() / want[1]["mu"].norm()).item()
    assert got[1]["mu"].shape == (mub, 21)
    assert max(err.values()) <= 1e-5, err


@pytest.mark.parametrize("normalize", [True, False])
def test_points_of_zero_weight_are_removed_and_an_empty_set_gives_zero(normalize) -> None:
    """Independent reference: the same points with the masked ones deleted (no weights at all); a batch entry
    whose every point is masked outputs 0 (softmax) like the unnormalised sum."""
    t = inputs(11, 15, 8, 2, ALL, 2)
    keep = torch.rand(2, 15, generator=torch.Generator().manual_seed(5)) > 0.4
    keep[1] = False
    t["mu"] = keep.double()
    static = dict(normalize=normalize, causal=False, features=ALL)
    got, _ = run(mlp_fused, t, torch.float64, DEVICE, **static, measure="importance")
    cols = keep[0].nonzero()[:, 0]
    sub = dict(
        t,
        a=t["a"][:1],
        rho=t["rho"][:1],
        xq=t["xq"][:1],
        b=t["b"][:1, cols],
        gamma=t["gamma"][:1, cols],
        xk=t["xk"][:1, cols],
        v=t["v"][:1, :, cols],
        mu=None,
    )
    want, _ = run(mlp_dense, sub, torch.float64, measure="counting", **static)
    torch.testing.assert_close(got[:1].cpu(), want, rtol=1e-10, atol=1e-12)
    assert torch.all(got[1] == 0)


def test_supported_says_why_inputs_are_refused() -> None:
    t = {k: None if x is None else x.float() for k, x in inputs(5, 5, 4, 1, ALL, 1).items()}
    args = [t[r] for r in ROLES]
    assert triton_mlp.supported(*args) is None
    assert "dtype" in triton_mlp.supported(*args[:6], args[6].int(), *args[7:])
    assert "no output" in triton_mlp.supported(*args[:2], args[2][:, :0], *args[3:])
    assert "float64" in triton_mlp.supported(*args[:6], args[6].double(), *args[7:])
    assert "float64" in triton_mlp.supported(*args[:6], args[6].double(), torch.ones(1, 5), *args[8:])


def test_generated_source_matches_the_snapshot() -> None:
    source = loader.render(templates.MLP_FUSED, templates.mlp_holes("mlp fused (ITNet pair kernel)"))
    assert "tl.tanh" not in source and "{{" not in source
    assert_matches_golden("mlp_fused", source)


# ------------------------------------------------------------------------------------------------- the layer
class Net(torch.nn.Module):
    def __init__(self, **layer: object):
        super().__init__()
        self.embed = torch.nn.Linear(4, 12)
        self.block = IntegralTransform(12, **{"heads": 3, "hidden": 8, **layer})
        self.head = torch.nn.Linear(12, 2)

    def forward(self, x, coords=None, mask=None):
        return self.head(self.block(self.embed(x), coords, mask=mask).flatten(1, -2))


LAYERS = {
    "sequence": (dict(), lambda: (torch.randn(2, 19, 4),)),
    "causal-measure": (dict(support="causal", normalize=False, hidden=32), lambda: (torch.randn(2, 21, 4),)),
    "grid": (dict(domain="grid", features=NO_HADAMARD), lambda: (torch.randn(2, 3, 5, 4),)),
    "points": (dict(domain="points", coord_dim=3, features=OFFSET_FOURIER),
               lambda: (torch.randn(2, 11, 4), torch.randn(2, 11, 3))),
    "points-masked": (dict(domain="points", coord_dim=2, normalize=False),
                      lambda: (torch.randn(2, 11, 4), torch.randn(2, 11, 2), torch.rand(2, 11) > 0.3)),
    "position-only": (dict(content=False, features=NO_HADAMARD, normalize=False, measure="counting", support="causal"),
                      lambda: (torch.randn(2, 13, 4),)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_converted_layer_model_runs_on_triton_without_fallback_and_trains_like_eager(name) -> None:
    torch.manual_seed(0)
    layer, make = LAYERS[name]
    model, args = Net(**layer), make()
    prog = itc.convert(model, args)
    assert [(t.family, t.lowering) for t in prog.transforms] in ([("mlp", "auto")], [("mlp", "fused")])
    mod = itc.build(prog, backend="triton")
    assert [t.lowering for t in mod.program.transforms] == ["fused"]
    want, got = model(*args), mod(*args)
    assert mod.fallbacks == {}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    want.square().sum().backward()
    got.square().sum().backward()
    params = dict(model.named_parameters())
    grads = dict(mod.gm.named_parameters())
    first = "block.proj_rho.weight" if model.block.content else "block.rho_bias"
    assert {"block.kernel.w_out", "block.kernel.b_out", first} <= grads.keys()
    for pname, p in grads.items():
        torch.testing.assert_close(p.grad, params[pname].grad, rtol=1e-4, atol=1e-6, msg=pname)
    assert mod.fallbacks == {}


def test_montecarlo_is_delegated_to_torch_without_a_fallback() -> None:
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 9, 4)
    mod = itc.build(itc.convert(model, (x,)), backend="triton", plan={"*": "montecarlo:samples=9"})
    out = mod(x)
    assert mod.fallbacks == {} and torch.isfinite(out).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_a_kernel_shared_by_the_batch_matches_dense_in_every_gradient(normalize) -> None:
    """ρ, γ and coordinates of batch 1 (a position-only kernel, evaluated once for the batch: stride 0) against the
    dense lowering on the same tensors; their gradients summed over the batch entries that read them."""
    t = inputs(19, 19, 8, 2, NO_HADAMARD, 1, batch=3)
    t["rho"], t["gamma"] = t["rho"][:1], t["gamma"][:1]
    static = dict(normalize=normalize, causal=True, features=NO_HADAMARD)
    got = run(mlp_fused, t, torch.float32, DEVICE, **static)
    want = run(mlp_dense, t, torch.float64, **static)
    assert got[1]["rho"].shape == (1, 19, 8) and got[0].shape == (3, 2, 19, 16)
    err = errors(got, want, NO_HADAMARD)
    assert max(err.values()) <= 1e-5, err
