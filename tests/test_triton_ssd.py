"""Triton chunked (SSD) kernels of the ``ssm`` family on the CPU through the interpreter: forward and final state
against the float64 dense kernel, gradients against torch autograd of the torch chunked lowering, the generated
source as a snapshot, the fallback for what the kernels do not take, and a transformers Mamba2Model end to end."""

from __future__ import annotations

import math
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import hypothesis  # noqa: E402,F401  (loaded up front: the Triton interpreter walks module members)
import pytest  # noqa: E402
import torch  # noqa: E402
from snapshots import assert_matches_golden  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.backends.torch.recurrent import ssm_chunked, ssm_dense  # noqa: E402
from itnet_compiler.backends.triton import loader, ssd, templates  # noqa: E402

DEVICE = "cuda" if os.environ.get("ITNET_TEST_GPU") else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = {
    # b, L, H, P, G, N, chunk, selective, D, dt_bias, h0, (softplus, dt_min, dt_max)
    "L21-chunk8-groups": (2, 21, 4, 3, 2, 5, 8, True, True, True, True, (True, 0.0, math.inf)),
    "L13-chunk4-noD-noh0": (1, 13, 3, 5, 1, 4, 4, True, False, False, False, (False, -math.inf, math.inf)),
    "L19-chunk16-clamped": (2, 19, 2, 2, 2, 3, 16, True, True, True, True, (True, 0.1, 0.6)),
    "L10-chunk64-P1": (1, 10, 4, 1, 4, 6, 64, True, True, True, False, (True, 0.0, math.inf)),
    "time-invariant": (2, 11, 4, 2, 2, 3, 4, False, True, False, True, (False, -math.inf, math.inf)),
}


def _inputs(case):
    b, L, H, P, G, N, _, sel, has_d, has_bias, has_h0, _ = case
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    return [
        rnd(b, L, H, P),
        rnd(b, L, H, scale=0.5) if sel else torch.rand(H, generator=g, dtype=torch.float64) * 0.5,
        -torch.rand(H, generator=g, dtype=torch.float64) - 0.1,
        rnd(b, L, G, N) if sel else rnd(G, N),
        rnd(b, L, G, N) if sel else rnd(G, N),
        rnd(H) if has_d else None,
        rnd(H, scale=0.3) if has_bias else None,
        rnd(b, H, P, N) if has_h0 else None,
    ]


def _static(case):
    soft, lo, hi = case[-1]
    return dict(dt_softplus=soft, dt_min=lo, dt_max=hi, return_state=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_ssd_forward_and_final_state_match_the_dense_kernel(name, dtype):
    case = CASES[name]
    ins = _inputs(case)
    y_ref, h_ref = ssm_dense(*ins, **_static(case))
    leaves = [None if t is None else t.to(dtype if i in (0, 3, 4) else torch.float32).to(DEVICE)
              for i, t in enumerate(ins)]  # fmt: skip
    y, h = ssd.ssd_chunked(*leaves, **_static(case), chunk=case[6])
    assert y.dtype == dtype and y.shape == ins[0].shape and h.dtype == torch.float32
    tol = 1e-4 if dtype == torch.float32 else 5e-3
    assert _rel(y.cpu(), y_ref) <= tol and _rel(h.cpu(), h_ref) <= tol
    y_only = ssd.ssd_chunked(*leaves, **{**_static(case), "return_state": False}, chunk=case[6])
    assert torch.equal(y_only, y)


@pytest.mark.parametrize("name", sorted(CASES))
def test_ssd_gradients_of_every_input_match_the_torch_lowering(name):
    case = CASES[name]
    ins = _inputs(case)
    ref_leaves = [None if t is None else t.clone().requires_grad_() for t in ins]
    leaves = [None if t is None else t.float().to(DEVICE).requires_grad_() for t in ins]
    y_ref, h_ref = ssm_chunked(*ref_leaves, **_static(case), chunk=case[6])
    y, h = ssd.ssd_chunked(*leaves, **_static(case), chunk=case[6])
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    dh = torch.randn(h_ref.shape, generator=g, dtype=torch.float64)
    present = [i for i, t in enumerate(ins) if t is not None]
    grads = torch.autograd.grad((y * dy.float().to(DEVICE)).sum() + (h * dh.float().to(DEVICE)).sum(),
                                [leaves[i] for i in present])  # fmt: skip
    ref_grads = torch.autograd.grad((y_ref * dy).sum() + (h_ref * dh).sum(), [ref_leaves[i] for i in present])
    roles = ("x", "dt", "A", "B", "C", "D", "dt_bias", "h0")
    for i, a, r in zip(present, grads, ref_grads, strict=True):
        assert a.shape == ins[i].shape
        assert _rel(a.cpu(), r) <= 1e-4, roles[i]
    # only the final state's gradient: the output path of the kernels sees dy = None
    (gx,) = torch.autograd.grad(ssd.ssd_chunked(*leaves, **_static(case), chunk=case[6])[1].sum(), [leaves[0]])
    (rx,) = torch.autograd.grad(ssm_chunked(*ref_leaves, **_static(case), chunk=case[6])[1].sum(), [ref_leaves[0]])
    assert _rel(gx.cpu(), rx) <= 1e-4


def test_ssd_kernel_matches_its_snapshot():
    """The source the backend loads is the snapshot (rendered exactly as ``ssd.kernels`` renders it)."""
    source = loader.render(templates.SSD, {"TITLE": "ssm chunked (SSD)", "KERNEL": templates.SSD_KERNEL})
    assert_matches_golden("ssm_chunked", source)
    assert open(ssd.kernels().__file__).read() == source


def test_per_state_decays_fall_back_with_a_reason_and_the_right_answer():
    """Mamba's A [H, N] has no chunked kernel: the layer runs the torch lowering (with the spec's chunk) and says so."""
    from transformers import MambaConfig, MambaModel

    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=1, vocab_size=50, intermediate_size=32,
                      use_cache=False, time_step_rank=4)  # fmt: skip
    model = MambaModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 9))
    x, A = torch.randn(1, 4, 2, 1), -torch.rand(2, 3)
    assert "A [H, N]" in ssd.supported(x, torch.rand(1, 4, 2), A, torch.randn(1, 4, 1, 3), torch.randn(1, 4, 1, 3))
    mod = itc.build(itc.convert(model, (ids,)), backend="triton", plan={"layers.*.mixer": "chunked:chunk=4"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = mod(ids)
    assert list(mod.fallbacks) == ["layers.0.mixer"] and "A [H, N]" in mod.fallbacks["layers.0.mixer"]
    assert sum("runs on the torch backend" in str(w.message) for w in caught) == 1
    assert _rel(out[0], model(ids).last_hidden_state) <= 1e-5


def test_mamba2_model_runs_and_trains_on_the_chunked_kernels():
    from transformers import Mamba2Config, Mamba2Model

    torch.manual_seed(0)
    cfg = Mamba2Config(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=64, use_cache=False, num_heads=8,
                       head_dim=8, n_groups=2, chunk_size=8, expand=2, initializer_range=0.2)  # fmt: skip
    model = Mamba2Model(cfg).eval()
    ids = torch.randint(0, 64, (2, 19))  # not a multiple of the chunk
    prog = itc.convert(model, (ids,))
    mod = itc.build(prog, backend="triton", plan={"*": "chunked:chunk=8"})
    lowerings = [(t.family, t.lowering) for t in mod.program.transforms]
    assert lowerings.count(("ssm", "chunked:chunk=8")) == 2
    out = mod(ids)
    assert mod.fallbacks == {}
    ref = model(ids).last_hidden_state
    assert _rel(out[0], ref) <= 1e-5
    r = torch.randn_like(ref)
    (out[0] * r).sum().backward()
    (ref * r).sum().backward()
    ref_params = dict(model.named_parameters())
    scale = max(p.grad.abs().max().item() for p in ref_params.values() if p.grad is not None)
    checked = set()
    for name, p in mod.gm.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5 * scale)
            checked.add(name.rsplit(".", 1)[-1])
    assert {"A_log", "D", "dt_bias"} <= checked


def test_states_past_the_kernel_tiles_are_refused_with_a_reason():
    """P·N above 64·128 would not compile on sm_90 (bench/compile_sm90.py): such layers go to torch with a reason."""
    meta = dict(device="meta")
    x, dt, a = torch.empty(1, 8, 2, 128, **meta), torch.empty(1, 8, 2, **meta), torch.empty(2, **meta)
    big = torch.empty(1, 8, 1, 256, **meta)
    assert "128×256" in ssd.supported(x, dt, a, big, big)
    x, ok = torch.empty(1, 8, 2, 64, **meta), torch.empty(1, 8, 1, 128, **meta)
    assert ssd.supported(x, dt, a, ok, ok) is None
