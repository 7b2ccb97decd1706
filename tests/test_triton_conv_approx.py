"""Triton ``lowrank`` and ``montecarlo`` lowerings of ``stationary`` against the torch lowerings with the same options:
outputs, error estimates and gradients, the sampled-taps template snapshot, and a real CNN built end to end."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import hypothesis  # noqa: E402,F401  (loaded up front: the Triton interpreter walks module members)
import pytest  # noqa: E402
import torch  # noqa: E402
from snapshots import assert_matches_golden  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.backends.torch import lowrank_conv as LC  # noqa: E402
from itnet_compiler.backends.torch import montecarlo_conv as MC  # noqa: E402
from itnet_compiler.backends.torch.runtime import RuntimeState  # noqa: E402
from itnet_compiler.backends.triton import conv_approx as CA  # noqa: E402
from itnet_compiler.backends.triton import loader  # noqa: E402
from itnet_compiler.backends.triton.templates.stationary_mc import STATIONARY_MC, STATIONARY_MC_KERNEL  # noqa: E402

DEVICE = "cuda" if os.environ.get("ITNET_TEST_GPU") else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# rank, C_in, C_out, kernel, stride, dilation, groups, padding, transposed, size
CASES = {
    "1d-strided-dilated": (1, 6, 8, 5, 2, 2, 1, 3, False, 23),
    "1d-grouped": (1, 8, 12, 3, 1, 1, 2, 1, False, 17),
    "2d-plain": (2, 8, 12, 3, 1, 1, 1, 1, False, 7),
    "2d-strided-grouped": (2, 8, 8, 3, 2, 1, 4, 1, False, 9),
    "2d-dilated": (2, 6, 10, 3, 1, 2, 1, 2, False, 8),
    "2d-transposed": (2, 8, 6, 3, 2, 1, 2, 1, True, 5),
}


def _case(name: str, dtype=torch.float32, seed: int = 0):
    rank, cin, cout, k, s, d, g, p, transposed, size = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, *([size] * rank), generator=gen)
    wshape = (cin, cout // g, *([k] * rank)) if transposed else (cout, cin // g, *([k] * rank))
    w = torch.randn(*wshape, generator=gen) / (cin * k**rank) ** 0.5
    b = torch.randn(cout, generator=gen)
    static = {"stride": (s,) * rank, "padding": ((p, p),) * rank, "dilation": (d,) * rank, "groups": g,
              "transposed": transposed, "output_padding": (1 if transposed else 0,) * rank,
              "padding_mode": "zeros"}  # fmt: skip
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (x, w, b)]
    return leaves, static


def _compare(fn_triton, fn_torch, leaves, static, options, dtype, error=False):
    """Same options, same seed: outputs, error estimates and gradients of x, weight, bias agree."""
    tol = TOL[dtype]
    kw = {**static, "layer": "conv", **options}
    with RuntimeState() as st_t:
        out_t = fn_triton(*leaves, **kw)
    with RuntimeState() as st_r:
        out_r = fn_torch(*leaves, **kw)
    assert out_t.dtype == out_r.dtype == dtype
    assert _rel(out_t, out_r) <= tol
    if error:
        et, er = st_t.errors["conv"], st_r.errors["conv"]
        assert (
            abs(et.abs - er.abs) <= tol * er.abs and abs(et.rel - er.rel) <= tol * er.rel and et.samples == er.samples
        )
    dy = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(7)).to(out_r)
    grads_t = torch.autograd.grad(out_t, leaves, dy)
    grads_r = torch.autograd.grad(out_r, leaves, dy)
    for a, b in zip(grads_t, grads_r, strict=True):
        assert _rel(a, b) <= tol
    return out_t, out_r


LOWRANK = {"svd": {"method": "svd", "rank": 3}, "spatial": {"method": "spatial", "rank": 4},
           "cp": {"method": "cp", "rank": 3, "iters": 6}, "learned": {"method": "learned", "rank": 4}}  # fmt: skip
# Every case once with svd; each other factorisation on a 1-d or a grouped and a strided/dilated/transposed case.
LOWRANK_RUNS = [(c, "svd") for c in CASES] + [("2d-dilated", "spatial"), ("2d-transposed", "spatial"),
                ("1d-strided-dilated", "cp"), ("2d-strided-grouped", "cp"), ("1d-grouped", "learned"),
                ("2d-plain", "learned")]  # fmt: skip


@pytest.mark.parametrize("case,method", LOWRANK_RUNS, ids=[f"{c}-{m}" for c, m in LOWRANK_RUNS])
def test_lowrank_chain_matches_the_torch_lowering(case, method):
    CA.TORCH_STEPS.clear()
    leaves, static = _case(case)
    out, _ = _compare(CA.conv_lowrank, LC.conv_lowrank, leaves, static, LOWRANK[method], torch.float32)
    assert not CA.TORCH_STEPS, "every step of a 1-d/2-d chain runs on the Triton conv"
    if case == "2d-plain":  # an approximation indeed: rank 3-4 of 12 output channels is not the convolution
        ref = torch.nn.functional.conv2d(leaves[0], leaves[1], leaves[2], 1, 1)
        assert _rel(out, ref) > 1e-3


MC_OPTS = {"uniform": {"samples": 5, "proposal": "uniform", "seed": 3}, "norm": {"samples": 7, "proposal": "norm"},
           "lowrank": {"samples": 6, "proposal": "lowrank", "rank": 2, "seed": 1}}  # fmt: skip
MC_RUNS = [(c, "norm") for c in CASES] + [("1d-grouped", "uniform"), ("2d-transposed", "uniform"),
           ("1d-strided-dilated", "lowrank"), ("2d-strided-grouped", "lowrank")]  # fmt: skip


@pytest.mark.parametrize("case,proposal", MC_RUNS, ids=[f"{c}-{p}" for c, p in MC_RUNS])
def test_shared_montecarlo_matches_the_torch_lowering(case, proposal):
    leaves, static = _case(case)
    opts = {**MC_OPTS[proposal], "mode": "shared"}
    out, _ = _compare(CA.conv_montecarlo, MC.conv_montecarlo, leaves, static, opts, torch.float32, error=True)
    other = CA.conv_montecarlo(*leaves, **static, layer="conv", **{**opts, "seed": 11})
    assert _rel(other, out) > 1e-3, "another seed draws other taps"


@pytest.mark.parametrize("case", ["1d-strided-dilated", "2d-strided-grouped"])
def test_half_precision_matches_loosely(case):
    leaves, static = _case(case, torch.float16)
    _compare(CA.conv_lowrank, LC.conv_lowrank, leaves, static, {"method": "svd", "rank": 3}, torch.float16)
    opts = {"samples": 6, "mode": "shared", "proposal": "uniform"}
    _compare(CA.conv_montecarlo, MC.conv_montecarlo, leaves, static, opts, torch.float16, error=True)


def test_per_row_montecarlo_is_refused_with_a_reason():
    leaves, static = _case("2d-plain")
    assert "mode=shared" in CA.montecarlo_supported(leaves[0], leaves[1], mode="per_row", **static)
    assert CA.montecarlo_supported(leaves[0], leaves[1], mode="shared", **static) is None
    vol = leaves[0][..., None]
    assert "1-d and 2-d" in CA.montecarlo_supported(vol, leaves[1][..., None], mode="shared", **static)


def test_sampled_taps_template_matches_snapshot_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ITNET_CACHE_DIR", str(tmp_path))
    holes = {"TITLE": "stationary montecarlo (shared taps)", "KERNEL": STATIONARY_MC_KERNEL}
    source = loader.render(STATIONARY_MC, holes)
    assert_matches_golden("stationary_montecarlo", source)
    loader._LOADED.clear()
    mod = CA.mc_kernels()
    path = loader.source_path("stationary_montecarlo", source)
    assert path.parent == tmp_path / "triton" and path.read_text() == source and mod.__file__ == str(path)
    assert CA.mc_kernels() is mod
    with pytest.raises(KeyError, match="unfilled"):
        loader.render(STATIONARY_MC, {"TITLE": "x"})


# ---------------------------------------------------------------------------------------------- a real model

PLANS = {"lowrank": "lowrank:method=svd,rank=4", "montecarlo": "montecarlo:samples=6,mode=shared,proposal=norm,seed=2"}


@pytest.fixture(scope="module")
def cnn():
    from examples.cnn import make_model

    model, _ = make_model()  # smaller inputs than its own: the interpreter runs every program on the CPU
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 3, 8, 8, generator=gen), torch.randn(1, 1, 4, 4, 4, generator=gen))
    return itc.convert(model, args), args


@pytest.mark.parametrize("lowering", list(PLANS))
def test_example_cnn_runs_its_2d_convs_on_triton_and_matches_torch(cnn, lowering):
    """Every 1-d and 2-d conv (grouped, depthwise, reflect/circular padding, transposed) runs here, not on torch;
    only the 3-d conv may fall back (montecarlo always; lowrank where the Triton conv has no 3-d kernel). One forward
    and one backward equal the torch backend's with the same plan."""
    prog, args = cnn
    plan = {"*": PLANS[lowering]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tri = itc.build(prog, backend="triton", plan=plan)
        ref = itc.build(prog, backend="torch", plan=plan)
        ins = [a.to(DEVICE).requires_grad_() for a in args]
        out_t, out_r = tri(*ins), ref(*ins)
    assert set(tri.fallbacks) <= {"vol"}, tri.fallbacks
    assert not CA.TORCH_STEPS.keys() & {t.name for t in prog.transforms}
    assert _rel(out_t, out_r) <= 1e-4
    if lowering == "montecarlo":
        et, er = tri.error_estimates, ref.error_estimates
        assert set(et) == set(er) and len(et) == len(prog.transforms)
        assert all(abs(et[k]["abs"] - er[k]["abs"]) <= 1e-4 * er[k]["abs"] for k in er)
    dy = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(1)).to(out_r)
    params_t = [p for _, p in sorted(tri.named_parameters())]
    params_r = [p for _, p in sorted(ref.named_parameters())]
    assert len(params_t) == len(params_r) > 10
    grads_t = torch.autograd.grad(out_t, ins + params_t, dy)
    grads_r = torch.autograd.grad(out_r, ins + params_r, dy)
    for a, b in zip(grads_t, grads_r, strict=True):
        assert _rel(a, b) <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_lowrank_conv_trains_for_several_steps_and_its_factors_follow_the_weight(backend):
    """Each training step builds the factors afresh (a cached autograd graph would be freed by the first backward),
    and the gradient is the exact one of the factorised layer: that of an explicit SVD chain in float64."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(6, 8, 3, padding=1)).train()
    x = torch.randn(2, 6, 9, 9)
    mod = itc.build(itc.convert(model, (x,)), backend=backend, plan={"*": "lowrank:method=svd,rank=3"})
    conv = dict(mod.gm.named_parameters())
    for _ in range(2):  # the second backward would fail if the factors' graph were cached
        mod.gm.zero_grad()
        out = mod(x)
        out.square().sum().backward()
    w = conv[next(k for k in conv if k.endswith("weight"))].detach().double().requires_grad_()
    b = conv[next(k for k in conv if k.endswith("bias"))].detach().double()
    u, s, vh = torch.linalg.svd(w.reshape(8, -1), full_matrices=False)
    approx = ((u[:, :3] * s[:3]) @ vh[:3]).reshape(w.shape)
    ref = torch.nn.functional.conv2d(x.double(), approx, b, padding=1)
    assert _rel(out.detach(), ref) <= 1e-5
    (grad,) = torch.autograd.grad(ref.square().sum(), w)
    got = conv[next(k for k in conv if k.endswith("weight"))].grad
    assert _rel(got, grad) <= 1e-4
