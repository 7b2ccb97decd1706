"""Triton ``montecarlo`` kernels for ``dot_exp`` against the torch montecarlo lowering with the same seed: estimates,
error estimates and gradients (both sample modes, causal or not, bool and additive masks, GQA), the generated source
as a snapshot, the fallback keeping the spec's options, and a converted BERT end to end (forward and one backward).

The torch lowering is the reference: both backends draw the same samples from one seed, so they agree to rounding.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import hypothesis  # noqa: E402,F401  (loaded up front: the Triton interpreter walks module members)
import pytest  # noqa: E402
import torch  # noqa: E402
from snapshots import assert_matches_golden  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.backends.torch import montecarlo as torch_mc  # noqa: E402
from itnet_compiler.backends.triton import loader  # noqa: E402
from itnet_compiler.backends.triton import montecarlo as tri_mc  # noqa: E402
from itnet_compiler.backends.triton.templates.montecarlo import DOT_EXP_SAMPLED, MONTECARLO  # noqa: E402

DEVICE = "cuda" if os.environ.get("ITNET_TEST_GPU") else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [
    # b, h, h_kv, l_q, l_k, d, causal, mask, mode, proposal (lowrank takes masks that vary over columns only)
    (1, 2, 2, 20, 20, 16, False, None, "per_row", "norm"),
    (2, 4, 2, 17, 17, 8, True, "bool", "per_row", "uniform"),
    (1, 2, 1, 12, 19, 16, False, "pad-additive", "per_row", "lowrank"),
    (1, 2, 2, 20, 20, 16, False, "row", "shared", "norm"),
    (2, 4, 2, 17, 17, 8, True, "additive", "shared", "uniform"),
    (1, 3, 3, 24, 24, 16, True, "pad-bool", "shared", "lowrank"),
]


def _inputs(case, seed: int = 0):
    b, h, hkv, lq, lk, d, _, mask_kind, _, _ = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, hh, n, d, generator=g) for hh, n in ((h, lq), (hkv, lk), (hkv, lk)))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, lq, lk, generator=g) > 0.4
        mask[..., 0] = True
    elif mask_kind == "additive":
        mask = torch.randn(b, h, lq, lk, generator=g) * 2
    elif mask_kind == "row":
        mask = torch.randn(lq, lk, generator=g)
    elif mask_kind == "pad-bool":
        mask = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        mask[..., lk - 5 :] = False
    elif mask_kind == "pad-additive":
        mask = torch.randn(b, 1, 1, lk, generator=g)
        mask[..., lk - 5 :] = float("-inf")
    return q * 1.5, k, v, mask


def _both(case, dtype, samples: int = 24, grad: bool = False):
    """(Triton run, torch run): each (output, ErrorEstimate, leaves) on the same inputs and spec."""
    *_, causal, _, mode, proposal = case
    q, k, v, mask = _inputs(case)
    kw = dict(scale=0.35, causal=causal, return_weights=False, return_error=True, samples=samples, mode=mode,
              proposal=proposal, seed=5, rank=4)  # fmt: skip
    runs = []
    for fn in (tri_mc.montecarlo_attention, torch_mc.attention_montecarlo):
        leaves = [x.to(DEVICE, dtype).requires_grad_(grad) for x in (q, k, v)]
        m = None if mask is None else mask.to(DEVICE, dtype if mask.is_floating_point() else torch.bool)
        out, est = fn(*leaves, m, **kw)
        runs.append((out, est, leaves))
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_matches_torch_lowering_with_the_same_seed(case, dtype):
    (out, est, _), (ref, ref_est, _) = _both(case, dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert _rel(out.cpu(), ref.cpu()) <= tol
    assert est.samples == ref_est.samples == 24
    assert est.fallback_rows == ref_est.fallback_rows
    assert abs(est.abs - ref_est.abs) <= tol * ref_est.abs and abs(est.rel - ref_est.rel) <= tol * ref_est.rel
    assert ref_est.abs > 0  # the estimates are of a real spread, not two zeros


def test_cases_cover_rows_with_no_usable_sample():
    """Few shared samples under causal support leave early rows without a sample: they are computed exactly (and
    differentiably: the gradients still match)."""
    (out, est, leaves), (ref, ref_est, ref_leaves) = _both(CASES[4], torch.float32, samples=4, grad=True)
    assert est.fallback_rows == ref_est.fallback_rows > 0
    assert _rel(out.cpu(), ref.cpu()) <= 1e-4
    grads = torch.autograd.grad(out.sum(), leaves)
    for a, r in zip(grads, torch.autograd.grad(ref.sum(), ref_leaves), strict=True):
        assert _rel(a.cpu(), r.cpu()) <= 1e-4


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_gradients_match_torch_autograd_of_the_lowering(case):
    """Same gradients as autograd through the torch lowering, including what a data-dependent proposal passes on
    to k and v through log q."""
    (out, _, leaves), (ref, _, ref_leaves) = _both(case, torch.float32, grad=True)
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad(out, leaves, do)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do)
    for name, a, r in zip("qkv", grads, ref_grads, strict=True):
        assert _rel(a.cpu(), r.cpu()) <= 1e-4, f"d{name}"


def test_generated_source_matches_snapshot():
    source = loader.render(MONTECARLO, {"TITLE": "dot_exp montecarlo gather-reduce", "KERNEL": DOT_EXP_SAMPLED})
    assert_matches_golden("dot_exp_montecarlo", source)
    assert open(tri_mc.kernels().__file__).read() == source


class _Attn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_unsupported_inputs_fall_back_once_with_the_spec_options():
    """float64 has no kernel: the layer runs the torch lowering with the plan's samples and seed (not defaults)."""
    torch.manual_seed(0)
    model = _Attn().double().eval()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    prog = itc.convert(model, (x,))
    plan = {"*": "montecarlo:samples=5,seed=3,block_s=16"}
    tri = itc.build(prog, backend="triton", plan=plan)
    with pytest.warns(UserWarning, match="runs on the torch backend: dtype torch.float64") as rec:
        out = tri(x)
        tri(x)
    assert len(rec) == 1 and list(tri.fallbacks) == ["attn"]
    ref = itc.build(prog, backend="torch", plan={"*": "montecarlo:samples=5,seed=3"})(x)
    default = itc.build(prog, backend="torch", plan={"*": "montecarlo"})(x)
    assert torch.equal(out, ref) and not torch.allclose(out, default)
    assert tri.error_estimates["attn"]["samples"] == 5


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_inputs_past_the_kernels_offsets_and_grid_are_refused():
    """Offsets inside one (batch, head) slice are 32-bit and batch·heads is the grid's second axis (at most 65535):
    larger inputs run in torch rather than fault on a card (the interpreter checks neither). Meta tensors: no memory."""
    q = _meta(1, 2, 1024, 64)
    assert tri_mc.supported(q, q, q, None) is None
    assert tri_mc.supported(q, q, q, _meta(1, 1, 1024, 1024).expand(8, 2, -1, -1)) is None  # bases are 64-bit
    small = _meta(1, 1, 16, 64)
    assert "2³¹" in tri_mc.supported(_meta(1, 1, 2**25, 64), small, small, None)
    strided = _meta(1, 2**18 + 16, 64, 128).transpose(1, 2)  # [B, L, H, D] storage: rows 64·128 apart
    assert "2³¹" in tri_mc.supported(strided, small, small, None)
    assert "2³¹" in tri_mc.supported(q, q, q, _meta(1, 1, 2**16, 2**15, dtype=torch.bool))
    assert "65535" in tri_mc.supported(_meta(1024, 64, 16, 64), _meta(1024, 64, 16, 64), _meta(1024, 64, 16, 64), None)
    kv = _meta(1, 4, 16, 64)
    assert "heads" in tri_mc.supported(_meta(1, 6, 16, 64), kv, kv, None)
    assert "batch" in tri_mc.supported(_meta(2, 4, 16, 64), kv, kv, None)


def _bert():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, attn_implementation="eager")  # fmt: skip
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0  # padding: a key mask the kernels read
    return BertModel(cfg).eval(), (ids, mask)


def test_bert_runs_on_the_kernels_and_matches_the_torch_backend():
    """Both sample modes in one model: the same output, error estimates and gradients as the torch backend."""
    model, args = _bert()
    prog = itc.convert(model, args)
    plan = {"encoder.layer.0.*": "montecarlo:samples=12,mode=per_row,proposal=norm,seed=2",
            "encoder.layer.1.*": "montecarlo:samples=12,mode=shared,seed=4"}  # fmt: skip
    tri = itc.build(prog, backend="triton", plan=plan)
    ref = itc.build(prog, backend="torch", plan=plan)
    assert [t.lowering.split(":")[0] for t in tri.program.transforms] == ["montecarlo"] * 2
    out, want = tri(*args), ref(*args)
    assert tri.fallbacks == {}
    assert _rel(out.last_hidden_state, want.last_hidden_state) <= 1e-4
    exact = model(*args).last_hidden_state
    assert _rel(out.last_hidden_state, exact) > 1e-3  # it did sample: 12 of 16 columns is not exact
    assert set(tri.error_estimates) == set(ref.error_estimates) == {t.name for t in prog.transforms}
    for layer, est in tri.error_estimates.items():
        assert est["abs"] == pytest.approx(ref.error_estimates[layer]["abs"], rel=1e-4)
        assert est["fallback_rows"] == ref.error_estimates[layer]["fallback_rows"]
    r = torch.randn(out.last_hidden_state.shape, generator=torch.Generator().manual_seed(3))
    named = [(n, p) for n, p in tri.gm.named_parameters() if p.requires_grad]
    ref_params = dict(ref.gm.named_parameters())
    grads = torch.autograd.grad((out.last_hidden_state * r).sum(), [p for _, p in named], allow_unused=True)
    ref_grads = torch.autograd.grad((want.last_hidden_state * r).sum(), [ref_params[n] for n, _ in named],
                                    allow_unused=True)  # fmt: skip
    checked = 0
    for (name, _), g, want_g in zip(named, grads, ref_grads, strict=True):
        assert (g is None) == (want_g is None), name
        if g is None:
            continue
        torch.testing.assert_close(g, want_g, rtol=1e-4, atol=1e-5 * want_g.abs().max().item())
        checked += 1
    assert checked >= len(named) - 2  # the pooler does not feed the first output
