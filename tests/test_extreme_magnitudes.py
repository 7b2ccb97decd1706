"""Attention at extreme magnitudes: ``dense`` and ``fused`` against softmax attention written out in float64.

float32 q, k of magnitude ~1e19 and up give logits no float32 holds (|q·k| > 3.4e38); float16 ones overflow at ~100.
The float64 reference holds all of them, and its softmax saturates: each row is the value at its largest logit. The
two torch lowerings must be finite wherever the reference is and agree with it; where SDPA's own answer is finite
and its logits fit, they agree with SDPA too. (SDPA's flash kernel on CPU scales after the product: at these sizes
it gives NaN rows, or rows of zeros when a row has few keys, neither of which is the softmax of the logits.) The
Triton kernel accumulates the logits in float32: exact up to logits of ~1e38, float16 inputs included.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from itnet_compiler.backends.torch.attention import attention_dense, attention_fused  # noqa: E402

DEVICE = "cuda" if os.environ.get("ITNET_TEST_GPU") else "cpu"
LOWERINGS = {
    "dense": attention_dense,
    # Small tiles: the online max and sum run across several row and column tiles.
    "fused": lambda *a, **kw: attention_fused(*a, **kw, block_q=16, block_k=16),
}
CASES = ["none", "causal", "bool", "additive", "hf-min", "window", "gqa"]


def reference(q, k, v, mask=None, *, scale: float, causal: bool = False, window: int = 0) -> torch.Tensor:
    """Softmax attention in float64, one step per line; a row that admits no key gives 0 (SDPA's convention)."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-2, -1)) * scale
    if mask is not None and mask.dtype == torch.bool:
        s = s.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        s = s + mask.double()
    i = torch.arange(q.shape[-2], device=q.device)[:, None]
    j = torch.arange(k.shape[-2], device=q.device)[None, :]
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    if window:
        s = s.masked_fill(i - j >= window, float("-inf"))
    live = (s > float("-inf")).any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~live, 0.0), dim=-1) * live
    return p @ v


def inputs(case: str, magnitude: float, length: int, dtype=torch.float32, d: int = 16, seed: int = 0):
    """q, k of the given magnitude, v of unit size, and the mask and support of ``case``: a bool mask with a row that
    admits nothing, an additive one with a row of -inf, transformers' padding mask (finfo.min on the last keys and on
    one whole row), a causal window of 3 keys, or grouped key/value heads."""
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads = 4, 2 if case == "gqa" else 4
    q = torch.randn(1, heads, length, d, generator=g) * magnitude
    k = torch.randn(1, kv_heads, length, d, generator=g) * magnitude
    v = torch.randn(1, kv_heads, length, d, generator=g)
    mask, causal, window = None, case in ("causal", "window"), 3 if case == "window" else 0
    if case == "bool":
        mask = torch.rand(length, length, generator=g) > 0.3
        mask[1] = False
    elif case == "additive":
        mask = torch.randn(length, length, generator=g)
        mask[torch.rand(length, length, generator=g) > 0.7] = float("-inf")
        mask[2] = float("-inf")
    elif case == "hf-min":
        mask = torch.zeros(length, length)
        mask[:, -2:] = torch.finfo(torch.float32).min
        mask[3] = torch.finfo(torch.float32).min
    to = {"device": DEVICE}
    q, k, v = (t.to(dtype=dtype, **to) for t in (q, k, v))
    if mask is not None:
        mask = mask.to(**to) if mask.dtype == torch.bool else mask.to(dtype=dtype, **to)
    return q, k, v, mask, {"scale": d**-0.5, "causal": causal, "window": window}


@pytest.mark.parametrize("length", [6, 40])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("magnitude", [1e18, 1e19, 1e20, 1e30])
@pytest.mark.parametrize("lowering", sorted(LOWERINGS))
def test_finite_and_equal_to_float64_at_magnitudes_whose_logits_overflow_float32(lowering, magnitude, case, length):
    """1e18: logits near float32's limit but inside it; 1e19: the unscaled product overflows, the scaled one fits
    for most pairs; 1e20 and up: no logit fits. Every row must be the float64 answer (saturated: one value row)."""
    q, k, v, mask, static = inputs(case, magnitude, length)
    out = LOWERINGS[lowering](q, k, v, mask, return_weights=False, **static)
    ref = reference(q, k, v, mask, **static)
    assert torch.isfinite(ref).all()
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).any(-1).sum().item()} rows are not finite"
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)


def _agree_where_finite(out: torch.Tensor, sdpa: torch.Tensor) -> None:
    rows = torch.isfinite(sdpa).all(-1)
    assert rows.any(), "SDPA has no finite row to compare with"
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[rows].double(), sdpa[rows].double(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("case", ["none", "causal", "bool", "additive"])
@pytest.mark.parametrize("lowering", sorted(LOWERINGS))
def test_equal_to_sdpa_where_its_logits_fit(lowering, case):
    """SDPA as the reference where its answer is the softmax of the logits: the default kernel at 1e18 (float32)
    and at 100 and 300 (float16, accumulated in float32, where a float16 product overflows), the math backend at 1e19
    (it scales q and k before the product)."""
    fn = LOWERINGS[lowering]
    for dtype, magnitude, backend in [
        (torch.float32, 1e18, None),
        (torch.float16, 100.0, None),
        (torch.float16, 300.0, None),
        (torch.float32, 1e19, SDPBackend.MATH),
    ]:
        q, k, v, mask, static = inputs(case, magnitude, 24, dtype)
        call = {"attn_mask": mask, "is_causal": static["causal"], "scale": static["scale"]}
        if backend is None:
            sdpa = F.scaled_dot_product_attention(q, k, v, **call)
        else:
            with sdpa_kernel(backend):
                sdpa = F.scaled_dot_product_attention(q, k, v, **call)
        out = fn(q, k, v, mask, return_weights=False, **static)
        assert out.dtype == dtype
        _agree_where_finite(out, sdpa)


@pytest.mark.parametrize("case", ["none", "causal", "bool"])
@pytest.mark.parametrize("lowering", sorted(LOWERINGS))
def test_gradients_at_overflowing_magnitudes_are_those_of_float64(lowering, case):
    """A saturated softmax passes the output gradient to the chosen value rows and nothing to q and k: finite, and
    equal to autograd through the float64 reference."""
    q, k, v, mask, static = inputs(case, 1e30, 40)
    grad = torch.randn(q.shape[:-1] + v.shape[-1:], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    LOWERINGS[lowering](*leaves, mask, return_weights=False, **static).backward(grad)
    wide = [t.double().requires_grad_() for t in (q, k, v)]
    reference(*wide, mask, **static).backward(grad.double())
    for mine, theirs in zip(leaves, wide, strict=True):
        assert torch.isfinite(mine.grad).all()
        torch.testing.assert_close(mine.grad.double(), theirs.grad, atol=1e-5, rtol=1e-5)


def test_dense_returns_finite_weights_at_overflowing_magnitudes():
    q, k, v, mask, static = inputs("bool", 1e30, 12)
    out, weights = attention_dense(q, k, v, mask, return_weights=True, **static)
    assert out.dtype == weights.dtype == torch.float32 and torch.isfinite(weights).all()
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, **static), atol=1e-6, rtol=1e-6)
    # one-hot rows, and zero rows where the mask admits nothing
    assert torch.equal(weights.sum(-1) == 1, mask.any(-1).expand(weights.shape[:-1]))


def _can_launch_triton() -> bool:
    return DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.mark.skipif(not _can_launch_triton(), reason="no CUDA device and TRITON_INTERPRET is not set")
@pytest.mark.parametrize("case", ["none", "causal", "bool"])
@pytest.mark.parametrize("dtype, magnitude", [(torch.float32, 1e18), (torch.float16, 300.0)])
def test_triton_kernel_is_exact_at_large_logits_that_float32_holds(dtype, magnitude, case):
    """Logits of ~1e36 (float32 inputs) and float16 inputs whose product no float16 holds: the kernel's float32
    accumulation keeps both finite and saturated like the float64 reference."""
    from itnet_compiler.backends.triton.attention import fused_attention

    q, k, v, mask, static = inputs(case, magnitude, 40, dtype)
    out = fused_attention(q, k, v, mask, scale=static["scale"], causal=static["causal"])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, **static), atol=2e-3, rtol=2e-3)
