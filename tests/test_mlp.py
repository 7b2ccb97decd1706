"""The native ITNet layer (``itnet_compiler.nn.IntegralTransform``, the ``mlp`` family): every lowering against the
dense one (values and float64 gradients), the layer captured by ``itc.convert`` as one transform that prints, parses,
plans, builds, exports to ONNX (onnxruntime) and converts from the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import itnet_compiler as itc
from itnet_compiler.backends.torch.mlp import _kernel, mlp_dense, mlp_fused, mlp_montecarlo
from itnet_compiler.backends.torch.montecarlo import montecarlo_transform
from itnet_compiler.ir.lowerings.options import MonteCarloOptions
from itnet_compiler.nn import IntegralTransform

FEATURE_SETS = [("hadamard", "offset", "dist2", "fourier"), ("offset", "fourier"), ("hadamard",), ("dist2",)]


def _inputs(features, n=9, m=None, hidden=6, heads=2, dv=3, dx=1, batch=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = n if m is None else m

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()

    had = "hadamard" in features
    a, b = (r(batch, n, hidden), r(batch, m, hidden)) if had else (None, None)
    tensors = [a, b, r(batch, n, hidden), r(batch, m, hidden), r(1, n, dx), r(1, m, dx), r(batch, heads, m, dv), None]
    params = [r(hidden, dx, scale=0.3), r(hidden, scale=0.1), r(hidden, dx), r(hidden), r(hidden), r(heads, hidden),
              r(heads)]  # fmt: skip
    return tensors, params


def _leaves(tensors, params):
    return [t for t in (*tensors, *params) if t is not None]


@pytest.mark.parametrize("features", FEATURE_SETS, ids="+".join)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_matches_dense_values_and_gradients(features, normalize, causal) -> None:
    tensors, params = _inputs(features, n=11)
    static = {"normalize": normalize, "causal": causal, "features": features}
    want = mlp_dense(*tensors, *params, **static)
    got = mlp_fused(*tensors, *params, **static, block_q=4, block_k=3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(want)
    leaves = _leaves(tensors, params)
    got_grads = torch.autograd.grad(got, leaves, go, allow_unused=True)
    want_grads = torch.autograd.grad(want, leaves, go, allow_unused=True)
    assert sum(g is not None for g in want_grads) >= 6  # a feature's weights are unused only without that feature
    for g_got, g_want in zip(got_grads, want_grads, strict=True):
        assert (g_got is None) == (g_want is None)
        if g_want is not None:
            torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("fn", [mlp_dense, mlp_fused], ids=["dense", "fused"])
def test_gradcheck_in_float64(fn) -> None:
    tensors, params = _inputs(FEATURE_SETS[0], n=5, hidden=3, heads=2, dv=2, batch=1)
    static = {"normalize": True, "causal": True, "features": FEATURE_SETS[0]}
    leaves = _leaves(tensors, params)

    def f(*xs):
        it = iter(xs)
        ts = [next(it) if t is not None else None for t in tensors]
        return fn(*ts, *[next(it) for _ in params], **static)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


def test_cross_transform_rows_and_columns_differ() -> None:
    tensors, params = _inputs(FEATURE_SETS[0], n=7, m=13, dx=2)
    static = {"normalize": True, "causal": False, "features": FEATURE_SETS[0]}
    torch.testing.assert_close(mlp_fused(*tensors, *params, **static, block_q=3, block_k=5),
                               mlp_dense(*tensors, *params, **static))  # fmt: skip


@pytest.mark.parametrize("normalize", [True, False])
def test_montecarlo_estimates_within_its_own_error_and_converges(normalize) -> None:
    tensors, params = _inputs(FEATURE_SETS[0], n=64, dtype=torch.float32, seed=3)
    tensors = [t.detach() if t is not None else None for t in tensors]
    params = [p.detach() for p in params]
    static = {"normalize": normalize, "causal": False, "features": FEATURE_SETS[0]}
    exact = mlp_dense(*tensors, *params, **static)
    errs, estimates = [], []
    for samples in (16, 1024):
        kernel = _kernel(*tensors[:6], None, params, normalize, False, FEATURE_SETS[0], "", "uniform")
        out, est = montecarlo_transform(kernel, tensors[6], MonteCarloOptions(samples=samples, seed=1))
        errs.append(((out - exact).norm() / exact.norm()).item())
        estimates.append(est.rel)
    assert errs[1] < errs[0] / 3, errs  # 64× the samples: the error falls like 1/√M
    for err, est in zip(errs, estimates, strict=True):  # the sampler's own estimate is of the true error's order
        assert est / 4 < err < est * 4, (errs, estimates)
    # differentiable (the draw is fixed by the seed): gradients reach every input
    leaves = [t.requires_grad_() for t in tensors if t is not None] + [p.requires_grad_() for p in params[:2]]
    out = mlp_montecarlo(*tensors, *params, **static, samples=16, seed=1)
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------------------- the layer
class Classifier(torch.nn.Module):
    def __init__(self, domain="sequence", support="full", normalize=True, coord_dim=None):
        super().__init__()
        self.embed = torch.nn.Linear(4, 16)
        self.block = IntegralTransform(16, heads=2, hidden=8, domain=domain, support=support, normalize=normalize,
                                       coord_dim=coord_dim)  # fmt: skip
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x, coords=None):
        h = self.block(self.embed(x), coords) if coords is not None else self.block(self.embed(x))
        return self.head(h.flatten(1, -2).mean(1))


CASES = {
    "sequence": (lambda: Classifier(), lambda: (torch.randn(2, 10, 4),)),
    "causal": (lambda: Classifier(support="causal"), lambda: (torch.randn(2, 10, 4),)),
    "measure": (lambda: Classifier(normalize=False), lambda: (torch.randn(2, 10, 4),)),
    "grid": (lambda: Classifier(domain="grid"), lambda: (torch.randn(2, 3, 4, 4),)),
    "points": (lambda: Classifier(domain="points", coord_dim=3), lambda: (torch.randn(2, 6, 4), torch.randn(2, 6, 3))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_model_with_the_layer_converts_prints_parses_and_trains_like_eager(name) -> None:
    torch.manual_seed(0)
    make, inputs = CASES[name]
    model, args = make(), inputs()
    prog = itc.convert(model, args)
    [node] = prog.transforms
    assert node.family == "mlp" and node.attrs.hidden == 8 and node.attrs.heads == 2
    assert str(itc.parse(str(prog))) == str(prog)
    want = model(*args)
    for plan in (None, {"*": "dense"}):
        mod = itc.build(prog, plan=plan)
        got = mod(*args)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    want.sum().backward()
    params = dict(model.named_parameters())
    for pname, p in mod.gm.named_parameters():
        torch.testing.assert_close(p.grad, params[pname].grad, rtol=1e-4, atol=1e-6)


def test_dynamic_length_and_a_saved_bundle(tmp_path) -> None:
    torch.manual_seed(0)
    model = Classifier(support="causal")
    seq = torch.export.Dim("seq", min=2, max=64)
    prog = itc.convert(model, (torch.randn(2, 10, 4),), dynamic_shapes={"x": {1: seq}})
    prog.save(tmp_path / "m.itir")
    mod = itc.build(itc.load(tmp_path / "m.itir"))
    for n in (5, 23):
        x = torch.randn(2, n, 4)
        torch.testing.assert_close(mod(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep", [False, True])
def test_onnx_export_matches_onnxruntime(keep) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = Classifier(support="causal")
    x = torch.randn(2, 10, 4)
    prog = itc.convert(model, (x,))
    onnx_model = itc.export_onnx(prog, keep_transforms=keep)
    assert keep == any(n.domain == "itnet" for n in onnx_model.graph.node)
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), rtol=1e-4, atol=1e-5)


def test_bad_layer_arguments_say_what_to_do() -> None:
    with pytest.raises(itc.ItnetError, match="multiple of heads"):
        IntegralTransform(10, heads=4)
    with pytest.raises(itc.ItnetError, match="features must be among"):
        IntegralTransform(8, heads=2, features=("hadamard", "nope"))
    with pytest.raises(itc.ItnetError, match="needs coord_dim"):
        IntegralTransform(8, heads=2, domain="points")
    layer = IntegralTransform(8, heads=2, domain="points", coord_dim=2)
    with pytest.raises(itc.ItnetError, match="takes coords"):
        layer(torch.randn(1, 5, 8))


def test_cli_converts_a_model_file_with_the_layer(tmp_path: Path) -> None:
    src = tmp_path / "itnet_model.py"
    src.write_text(textwrap.dedent('''
        import torch
        from itnet_compiler.nn import IntegralTransform

        def make():
            torch.manual_seed(0)
            layer = IntegralTransform(8, heads=2, hidden=8, support="causal")
            return torch.nn.Sequential(layer), (torch.randn(2, 12, 8),)
    '''))  # fmt: skip
    out = tmp_path / "m.itir"
    cli = Path(__file__).resolve().parents[1] / "cli.py"
    done = subprocess.run([sys.executable, str(cli), "convert", f"{src}:make", "-o", str(out)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    text = (out / "program.itir").read_text()
    assert 'family="mlp"' in text and 'support="causal"' in text
    # the saved program loads and runs (a Sequential's layer "0.kernel" must still give valid value names)
    torch.testing.assert_close(itc.build(itc.load(out))(torch.ones(2, 12, 8)).shape, torch.Size([2, 12, 8]))


def test_mlir_export_keeps_the_length_dynamic() -> None:
    """The fused lowering's row-block loop would specialise the length: MLIR export writes the exact dense form."""
    torch.manual_seed(0)
    seq = torch.export.Dim("seq", min=2, max=64)
    prog = itc.convert(Classifier(support="causal"), (torch.randn(2, 10, 4),), dynamic_shapes={"x": {1: seq}})
    text = itc.export_mlir(prog, dialect="linalg")
    assert "tensor<2x?x4xf32>" in text and "func.func @forward" in text
