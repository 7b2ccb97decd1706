"""Triton ``hybrid`` kernels for ``dot_exp`` against the torch hybrid lowering with the same seed: outputs, error
estimates and gradients (causal or not, sampled or pooled values, GQA, partial blocks, fp16), and a converted GPT-2
on the Triton backend with no fallback. Both backends take the torch selection, so they agree to rounding."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import hypothesis  # noqa: E402,F401  (loaded up front: the Triton interpreter walks module members)
import pytest  # noqa: E402
import torch  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.backends.torch import hybrid as torch_h  # noqa: E402
from itnet_compiler.backends.triton import hybrid as tri_h  # noqa: E402

DEVICE = "cuda" if os.environ.get("ITNET_TEST_GPU") else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [
    # b, h, h_kv, l_q, l_k, d, causal, values, block
    (1, 2, 2, 100, 100, 16, True, "sampled", 32),
    (1, 2, 2, 96, 130, 16, False, "pooled", 32),
    (2, 4, 2, 64, 64, 8, True, "pooled", 16),
    (1, 1, 1, 80, 80, 32, True, "sampled", 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernels_match_the_torch_lowering(case, dtype):
    b, h, hkv, lq, lk, d, causal, values, block = case
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(b, hh, n, d, generator=g) for hh, n in ((h, lq), (hkv, lk), (hkv, lk))]
    kw = dict(scale=0.4, causal=causal, return_weights=False, return_error=True, block=block, blocks=2, samples=20,
              values=values, seed=3)  # fmt: skip
    runs = []
    for fn in (tri_h.hybrid_attention, torch_h.attention_hybrid):
        leaves = [x.to(DEVICE, dtype).requires_grad_(True) for x in base]
        out, est = fn(*leaves, **kw)
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
        runs.append((out, est, torch.autograd.grad(out, leaves, do)))
    (out, est, grads), (ref, ref_est, ref_grads) = runs
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _rel(out.cpu(), ref.cpu()) <= tol
    for name, a, r in zip("qkv", grads, ref_grads, strict=True):
        assert _rel(a.cpu(), r.cpu()) <= tol, f"d{name}"
    assert ref_est.parts["sampling"] > 0  # something was sampled
    assert est.rel == pytest.approx(ref_est.rel, rel=10 * tol)


def test_masks_are_refused_with_a_reason():
    q = torch.randn(1, 1, 32, 16)
    assert "mask" in tri_h.supported(q, q, q, torch.ones(32, 32, dtype=torch.bool))
    assert tri_h.supported(q, q, q, None) is None


def test_gpt2_runs_on_the_kernels_without_fallback():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                  use_cache=False, attn_implementation="sdpa")  # fmt: skip
    model = transformers.GPT2Model(cfg).eval()
    ids = torch.randint(0, 100, (1, 128), generator=torch.Generator().manual_seed(1))
    prog = itc.convert(model, (ids,))
    plan = {"*": "hybrid:block=32,blocks=2,samples=16,seed=1"}
    tri = itc.build(prog, backend="triton", plan=plan)
    ref = itc.build(prog, backend="torch", plan=plan)
    out, want = tri(ids).last_hidden_state, ref(ids).last_hidden_state
    assert tri.fallbacks == {}
    assert _rel(out, want) <= 1e-4
    assert _rel(out, model(ids).last_hidden_state) > 1e-4  # it did approximate
    for layer, est in tri.error_estimates.items():
        assert est["rel"] == pytest.approx(ref.error_estimates[layer]["rel"], rel=1e-3)
