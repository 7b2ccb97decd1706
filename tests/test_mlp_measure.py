"""The measure of the ITNet layer (``mlp`` family): uniform, counting and importance (point weights ``mu``, a padding
mask), in every torch lowering against independent references (the same points with the masked ones deleted; the
uniform measure times M), float64 gradients of the weights; the layer's ``mask=`` / ``weights=`` and its
position-only kernel (``content=False``), converted, built, exported to ONNX (onnxruntime) like eager."""

from __future__ import annotations

import pytest
import torch

import itnet_compiler as itc
from itnet_compiler.backends.torch.mlp import mlp_dense, mlp_fused, mlp_montecarlo
from itnet_compiler.backends.torch.mlp_lowrank import mlp_lowrank
from itnet_compiler.backends.torch.runtime import RuntimeState
from itnet_compiler.nn import IntegralTransform

ALL = ("hadamard", "offset", "dist2", "fourier")


def _inputs(n=9, m=12, hidden=6, heads=2, dv=3, dx=2, batch=2, seed=0):
    """a, b, rho, gamma, xq, xk, v and the kernel's parameters, float64."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    tensors = [r(batch, n, hidden), r(batch, m, hidden), r(batch, n, hidden), r(batch, m, hidden), r(batch, n, dx),
               r(batch, m, dx), r(batch, heads, m, dv)]  # fmt: skip
    params = [r(hidden, dx, scale=0.3), r(hidden, scale=0.1), r(hidden, dx), r(hidden), r(hidden), r(heads, hidden),
              r(heads)]  # fmt: skip
    return tensors, params


def _drop_columns(tensors, batch: int, cols: torch.Tensor):
    """Batch entry ``batch`` with only the columns ``cols``: the reference for a mask."""
    a, b, rho, gamma, xq, xk, v = tensors
    sl = slice(batch, batch + 1)
    return [a[sl], b[sl, cols], rho[sl], gamma[sl, cols], xq[sl], xk[sl, cols], v[sl, :, cols]]


FNS = {"dense": mlp_dense, "fused": lambda *a, **k: mlp_fused(*a, **k, block_q=4, block_k=5),
       "nystrom": lambda *a, **k: mlp_lowrank(*a, **k, method="nystrom", rank=12)}  # fmt: skip


@pytest.mark.parametrize("fn", sorted(FNS))
@pytest.mark.parametrize("normalize", [True, False])
def test_a_mask_removes_points_exactly_and_an_empty_set_gives_zero(fn, normalize) -> None:
    """``nystrom`` at full rank is exact, so it is held to the same reference."""
    tensors, params = _inputs()
    keep = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1], [0] * 12], dtype=torch.bool)
    static = {"normalize": normalize, "causal": False, "features": ALL}
    got = FNS[fn](*tensors, keep.double(), *params, **static, measure="importance")
    cols = keep[0].nonzero()[:, 0]
    want = mlp_dense(*_drop_columns(tensors, 0, cols), None, *params, **static, measure="counting")
    torch.testing.assert_close(got[:1], want, rtol=1e-8, atol=1e-10)
    assert torch.all(got[1] == 0) and torch.isfinite(got).all()


@pytest.mark.parametrize("causal", [False, True])
def test_counting_is_uniform_times_m_and_importance_with_equal_weights_is_uniform(causal) -> None:
    tensors, params = _inputs(n=12)
    static = {"normalize": False, "causal": causal, "features": ALL}
    uniform = mlp_dense(*tensors, None, *params, **static)
    counting = mlp_fused(*tensors, None, *params, **static, measure="counting", block_q=5, block_k=4)
    torch.testing.assert_close(counting, uniform * 12, rtol=1e-10, atol=1e-12)
    equal = torch.full((1, 12), 1 / 12, dtype=torch.float64)
    torch.testing.assert_close(mlp_fused(*tensors, equal, *params, **static, measure="importance"), uniform)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_gradients_of_the_weights_match_dense_and_gradcheck(normalize, causal) -> None:
    tensors, params = _inputs(n=12, m=12, hidden=4, batch=1)
    mu = (torch.rand(1, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.1).requires_grad_()
    leaves = [t.requires_grad_() for t in tensors] + [p.requires_grad_() for p in params]
    static = {"normalize": normalize, "causal": causal, "features": ALL, "measure": "importance"}
    want = mlp_dense(*tensors, mu, *params, **static)
    got = mlp_fused(*tensors, mu, *params, **static, block_q=5, block_k=4)
    go = torch.randn_like(want)
    g_want = torch.autograd.grad(want, [mu, *leaves], go)
    g_got = torch.autograd.grad(got, [mu, *leaves], go)
    assert g_want[0].abs().max() > 1e-3  # the weights do move the output
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert torch.autograd.gradcheck(lambda w: mlp_dense(*tensors, w, *params, **static), (mu,), eps=1e-6, atol=1e-6)


def test_montecarlo_never_draws_a_masked_point_and_is_exact_when_every_kept_point_is_drawn() -> None:
    """Norm proposal ∝ μ_j‖v_j‖: masked points have probability 0; with 4 kept points and 4096 draws the estimate is
    within sampling noise of the exact masked transform."""
    tensors, params = _inputs(m=12)
    keep = torch.zeros(2, 12)
    keep[:, [1, 5, 6, 10]] = 1.0
    static = {"normalize": True, "causal": False, "features": ALL, "measure": "importance"}
    want = mlp_dense(*tensors, keep.double(), *params, **static)
    got = mlp_montecarlo(*tensors, keep.double(), *params, **static, samples=4096, proposal="norm", seed=0)
    assert ((got - want).norm() / want.norm()).item() < 0.05


@pytest.mark.parametrize("normalize", [True, False])
def test_learned_lowrank_keeps_the_measure_out_of_its_fit(normalize) -> None:
    """Features fitted on K without the measure; the weights go into ψ. A masked point then contributes nothing,
    however the fit went: the output does not change when a masked point's values change."""
    tensors, params = _inputs(n=16, m=16)
    keep = (torch.arange(16) % 3 != 0).double()[None].expand(2, 16)
    static = {"normalize": normalize, "causal": False, "features": ALL, "measure": "importance"}
    opts = {"method": "learned", "rank": 6, "steps": 30, "calib": 16, "layer": f"measure-test-{normalize}"}
    first = mlp_lowrank(*tensors, keep, *params, **static, **opts)
    poked = list(tensors)
    poked[6] = tensors[6].clone()
    poked[6][:, :, 0] += 100.0  # point 0 is masked
    second = mlp_lowrank(*poked, keep, *params, **static, **opts)
    torch.testing.assert_close(first, second)
    exact = mlp_dense(*tensors, keep, *params, **static)
    assert torch.isfinite(first).all() and ((first - exact).norm() / exact.norm()).item() < 1.0


# ------------------------------------------------------------------------------------------------- the layer
class PointNet(torch.nn.Module):
    def __init__(self, normalize=True, measure="uniform"):
        super().__init__()
        self.embed = torch.nn.Linear(3, 8)
        self.block = IntegralTransform(8, heads=2, hidden=8, domain="points", coord_dim=2, normalize=normalize,
                                       measure=measure)  # fmt: skip
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x, coords, mask):
        return self.head(self.block(self.embed(x), coords, mask=mask))


def _point_batch():
    torch.manual_seed(1)
    x, coords = torch.randn(2, 10, 3), torch.rand(2, 10, 2)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False  # a set of 6 points padded to 10
    mask[1, [2, 7]] = False
    return x, coords, mask


@pytest.mark.parametrize("normalize", [True, False])
def test_a_padded_point_set_gives_what_the_unpadded_set_gives(normalize) -> None:
    model = PointNet(normalize=normalize)
    x, coords, mask = _point_batch()
    out = model(x, coords, mask)
    for bi in range(2):
        kept = mask[bi].nonzero()[:, 0]
        alone = model(x[bi : bi + 1, kept], coords[bi : bi + 1, kept], None)
        torch.testing.assert_close(out[bi : bi + 1, kept], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("measure", ["uniform", "counting"])
def test_a_masked_model_converts_with_the_importance_measure_and_builds_and_exports_like_eager(measure) -> None:
    import onnxruntime as ort

    model = PointNet(normalize=False, measure=measure)
    args = _point_batch()
    prog = itc.convert(model, args)
    [node] = prog.transforms
    assert node.attrs.measure == "importance" and "importance measure" in node.attrs.params()
    assert "mu=%" in str(prog) and 'measure="importance"' in str(prog)
    assert str(itc.parse(str(prog))) == str(prog)
    want = model(*args)
    for plan in (None, {"*": "dense"}, {"*": "lowrank:method=nystrom,rank=10"}):
        torch.testing.assert_close(itc.build(prog, plan=plan)(*args), want, rtol=1e-5, atol=1e-5)
    onnx_model = itc.export_onnx(prog)
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args, strict=True)}
    (got,) = sess.run(None, feeds)
    torch.testing.assert_close(torch.from_numpy(got), want.detach(), rtol=1e-4, atol=1e-5)


def test_weights_are_quadrature_weights() -> None:
    """Doubling a point's weight under the counting measure equals duplicating the point."""
    torch.manual_seed(0)
    layer = IntegralTransform(6, heads=2, hidden=8, domain="points", coord_dim=1, normalize=False, measure="counting")
    u, x = torch.randn(1, 5, 6), torch.randn(1, 5, 1)
    w = torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0]])
    weighted = layer(u, x, weights=w)
    dup = layer(torch.cat([u, u[:, 1:2]], 1), torch.cat([x, x[:, 1:2]], 1))
    torch.testing.assert_close(weighted, dup[:, :5], rtol=1e-5, atol=1e-6)


def test_a_position_only_kernel_is_a_linear_time_invariant_operator() -> None:
    """content=False: y(u) − y(0) is linear in u and, on a causal sequence with the counting measure, shifting the
    input right by s shifts the output (the kernel sees only the offset)."""
    torch.manual_seed(0)
    layer = IntegralTransform(6, heads=2, hidden=16, features=("offset", "dist2", "fourier"), content=False,
                              normalize=False, measure="counting", support="causal")  # fmt: skip
    u1, u2, zero = torch.randn(1, 12, 6), torch.randn(1, 12, 6), torch.zeros(1, 12, 6)
    f0 = layer(zero)
    torch.testing.assert_close(layer(u1 + 2 * u2) - f0, (layer(u1) - f0) + 2 * (layer(u2) - f0), rtol=1e-5, atol=1e-5)
    shifted = torch.cat([zero[:, :3], u1[:, :9]], 1)
    torch.testing.assert_close((layer(shifted) - f0)[:, 3:], (layer(u1) - f0)[:, :9], rtol=1e-5, atol=1e-5)
    content = IntegralTransform(6, heads=2, hidden=16, normalize=False, measure="counting", support="causal")
    lin = content(u1 + 2 * u2) - content(zero) - (content(u1) - content(zero)) - 2 * (content(u2) - content(zero))
    assert lin.abs().max() > 1e-3  # the content kernel is not linear: the check above can fail


def test_the_layer_returns_a_fresh_tensor() -> None:
    out = IntegralTransform(8, heads=2, hidden=4)(torch.randn(1, 5, 8))
    assert out._base is None


def test_bad_measure_arguments_say_what_to_do() -> None:
    with pytest.raises(itc.ItnetError, match="measure is uniform or counting"):
        IntegralTransform(8, heads=2, measure="importance")
    with pytest.raises(itc.ItnetError, match="takes no hadamard"):
        IntegralTransform(8, heads=2, content=False)
    layer = IntegralTransform(8, heads=2, hidden=4)
    with pytest.raises(itc.ItnetError, match=r"mask must be \[2, 5\]"):
        layer(torch.randn(2, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(itc.ItnetError, match="mask is a bool tensor"):
        layer(torch.randn(2, 5, 8), mask=torch.ones(2, 5))
    for bad in (-1.0, float("nan")):
        with pytest.raises(itc.ItnetError, match="weights must be non-negative"):
            layer(torch.randn(2, 5, 8), weights=torch.ones(2, 5).index_fill(1, torch.tensor([2]), bad))


def test_the_tuner_measures_every_lowering_the_layer_admits_and_keeps_its_budget() -> None:
    """lowrank's default method (favor) does not apply to the mlp kernel, its nystrom and learned moves do; a
    montecarlo proposal the kernel has no features for is not offered. The chosen plan, built, stays within the
    budget of the eager model on held-out padded point sets."""
    from itnet_compiler.tuner import candidate_specs

    torch.manual_seed(0)
    model = PointNet()

    def batch():
        return torch.randn(2, 32, 3), torch.rand(2, 32, 2), torch.rand(2, 32) > 0.2

    prog = itc.convert(model, batch())
    [node] = prog.transforms
    specs = candidate_specs(node, "torch", 0.05)
    assert {"fused", "dense", "lowrank:method=nystrom", "lowrank:method=learned"} <= set(specs)
    assert "montecarlo:proposal=lowrank" not in specs and "lowrank" not in specs
    plan = itc.tune(prog, [batch()], budget=0.05, held_out=[batch()], repeat=1)
    measured = {c["spec"]: c for c in plan.measurements["block.kernel"]["candidates"]}
    assert not any("failed" in c for c in measured.values()), measured
    assert "lowrank:method=learned" in measured
    held = batch()
    want = model(*held)
    got = itc.build(prog, plan=plan.layers)(*held)
    assert ((got - want).norm() / want.norm()).item() <= 0.05


LOWERINGS = {"dense": mlp_dense, "fused": lambda *a, **k: mlp_fused(*a, **k, block_q=4, block_k=5),
             "montecarlo": lambda *a, **k: mlp_montecarlo(*a, **k, samples=6, seed=3),
             "nystrom": lambda *a, **k: mlp_lowrank(*a, **k, method="nystrom", rank=5),
             "learned": lambda *a, **k: mlp_lowrank(*a, **k, method="learned", rank=4, steps=5, calib=16,
                                                    layer="shared-batch-test")}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LOWERINGS))
@pytest.mark.parametrize("causal", [False, True])
def test_a_kernel_shared_by_the_batch_gives_what_its_per_entry_copies_give(name, causal) -> None:
    """ρ, γ and the coordinates of batch 1 (a position-only kernel) against the same tensors expanded to the batch:
    values and gradients, every torch lowering (the sampled and fitted ones with the same seeds)."""
    tensors, params = _inputs(n=12, m=12, batch=3)
    a, b, rho, gamma, xq, xk, v = tensors
    shared = [None, None, rho[:1], gamma[:1], xq[:1], xk[:1], v]
    copies = [None, None, *(t[:1].expand(3, *t.shape[1:]) for t in (rho, gamma, xq, xk)), v]
    static = {"normalize": name != "nystrom", "causal": causal, "features": ("offset", "dist2", "fourier")}
    fn = LOWERINGS[name]
    outs = []
    for ts in (shared, copies):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in ts]
        out = fn(*leaves, None, *params, **static)
        grads = torch.autograd.grad(out, [leaves[2], leaves[3]], torch.ones_like(out))
        outs.append((out, [g if g.shape[0] == 1 else g.sum(0, keepdim=True) for g in grads]))
    assert outs[0][0].shape == (3, 2, 12, 3)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-9, atol=1e-10)
    for g_shared, g_copies in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(g_shared, g_copies, rtol=1e-6, atol=1e-8)  # nystrom: pinv of other rounding


def test_point_coordinates_shared_by_the_batch() -> None:
    """coords [1, N, d] (one point layout for every entry) equals the same coordinates repeated per entry."""
    torch.manual_seed(0)
    layer = IntegralTransform(8, heads=2, hidden=8, domain="points", coord_dim=2, content=False,
                              features=("offset", "fourier"))  # fmt: skip
    u, x = torch.randn(3, 7, 8), torch.rand(1, 7, 2)
    torch.testing.assert_close(layer(u, x), layer(u, x.expand(3, 7, 2)), rtol=1e-6, atol=1e-6)
    with pytest.raises(itc.ItnetError, match="takes coords"):
        layer(u, torch.rand(2, 7, 2))


APPROX = {"montecarlo": dict(fn=mlp_montecarlo, samples=5, proposal="uniform", seed=2),
          "nystrom": dict(fn=mlp_lowrank, method="nystrom", rank=3),
          "learned": dict(fn=mlp_lowrank, method="learned", rank=3, steps=5, calib=8, layer="gradcheck")}  # fmt: skip


@pytest.mark.parametrize("name", sorted(APPROX))
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_of_the_approximate_lowerings_with_weights(name, normalize) -> None:
    """The approximations are differentiable functions of every input (draws and fits fixed by their seeds), the
    point weights included; at full rank nystrom's gradients are dense's."""
    tensors, params = _inputs(n=6, m=6, hidden=3, dv=2, batch=1)
    mu = torch.rand(1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.2
    opts = dict(APPROX[name])
    fn = opts.pop("fn")
    static = {"normalize": normalize, "causal": False, "features": ALL, "measure": "importance"}
    leaves = [tensors[2], tensors[3], tensors[6], mu, params[5]]

    def f(rho, gamma, v, w, w_out):
        ts = [tensors[0], tensors[1], rho, gamma, tensors[4], tensors[5], v]
        return fn(*ts, w, *params[:5], w_out, params[6], **static, **opts)

    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    with RuntimeState():  # the learned features are fitted once (as a built module keeps them), then held fixed
        assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-5)
    if name == "nystrom":
        full = dict(opts, rank=6)
        got = torch.autograd.grad(fn(*tensors[:2], *leaves[:2], *tensors[4:6], leaves[2], leaves[3], *params[:5],
                                     leaves[4], params[6], **static, **full).sum(), leaves)  # fmt: skip
        want = torch.autograd.grad(mlp_dense(*tensors[:2], *leaves[:2], *tensors[4:6], leaves[2], leaves[3],
                                             *params[:5], leaves[4], params[6], **static).sum(), leaves)  # fmt: skip
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
