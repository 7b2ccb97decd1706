"""Differential tests: every torch (family, lowering) against an independent float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from itnet_compiler.backends.torch import lowerings as L
from itnet_compiler.errors import ItnetError


def reference_attention(q, k, v, mask=None, *, scale, causal):
    """Softmax attention written out in float64 with explicit loops over heads: the oracle."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, lq, _ = q.shape
    rep = h // k.shape[1]
    out = torch.empty(b, h, lq, v.shape[-1], dtype=torch.float64)
    for head in range(h):
        kh, vh = k[:, head // rep], v[:, head // rep]
        logits = torch.einsum("bid,bjd->bij", q[:, head], kh) * scale
        if mask is not None:
            m = mask.expand(b, h, lq, k.shape[2])[:, head]
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.double()
        if causal:
            i = torch.arange(lq)[:, None]
            j = torch.arange(k.shape[2])[None, :]
            logits = logits.masked_fill(j > i, float("-inf"))
        w = torch.exp(logits - logits.amax(-1, keepdim=True))
        out[:, head] = torch.einsum("bij,bjd->bid", w / w.sum(-1, keepdim=True), vh)
    return out


def _qkv(b, h, hkv, lq, lk, d, peaked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    if peaked:  # large logits: low-entropy rows as in trained models
        q = q * 4.0
    return q, k, v


def _entropy(q, k, scale):
    p = torch.softmax((q @ k.transpose(-2, -1)) * scale, -1)
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()


MASKS = ["none", "bool", "additive", "bool-broadcast", "additive-row"]


def _mask(kind, b, h, lq, lk, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "bool":
        m = torch.rand(b, h, lq, lk, generator=g) > 0.3
        m[..., 0] = True  # keep every row non-empty
        return m
    if kind == "bool-broadcast":
        m = torch.rand(b, 1, 1, lk, generator=g) > 0.3
        m[..., 0] = True
        return m
    if kind == "additive":
        return torch.randn(b, h, lq, lk, generator=g)
    return torch.randn(lq, lk, generator=g)


@pytest.mark.parametrize("lowering", ["dense", "library", "fused"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 4, 33, 33, 16), (1, 8, 2, 17, 40, 8), (2, 4, 1, 64, 64, 32)])
def test_dot_exp_lowerings_match_float64_reference(lowering, mask_kind, causal, shape):
    b, h, hkv, lq, lk, d = shape
    q, k, v = _qkv(b, h, hkv, lq, lk, d, peaked=True)
    mask = _mask(mask_kind, b, h, lq, lk)
    scale = d**-0.5
    fn = {"dense": L.attention_dense, "library": L.attention_library, "fused": L.attention_fused}[lowering]
    extra = {"block_q": 8, "block_k": 16} if lowering == "fused" else {}
    out = fn(q, k, v, mask, scale=scale, causal=causal, return_weights=False, **extra)
    ref = reference_attention(q, k, v, mask, scale=scale, causal=causal)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= 1e-5, f"relative error {err}"


def test_peaked_inputs_are_peaked():
    q, k, _ = _qkv(2, 4, 4, 64, 64, 32, peaked=True)
    assert _entropy(q, k, 32**-0.5) <= 3.0


def test_dot_exp_float64_is_exact_to_round_off():
    q, k, v = (t.double() for t in _qkv(1, 2, 2, 50, 50, 16, peaked=True))
    ref = reference_attention(q, k, v, scale=0.25, causal=True)
    for fn in (L.attention_dense, L.attention_fused):
        out = fn(q, k, v, scale=0.25, causal=True, return_weights=False)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-12


def test_dense_returns_normalised_weights():
    q, k, v = _qkv(1, 2, 2, 9, 11, 8)
    out, w = L.attention_dense(q, k, v, scale=0.3, causal=False, return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 9))
    torch.testing.assert_close(out, w @ v)
    with pytest.raises(ItnetError, match="cannot return attention weights"):
        L.attention_fused(q, k, v, scale=0.3, causal=False, return_weights=True)


def test_fused_memory_never_holds_the_full_kernel():
    """The fused lowering's largest temporary is a tile, not L_q × L_k (counted by the allocator's peak)."""
    q, k, v = _qkv(1, 1, 1, 2048, 2048, 16)
    tile = 128 * 256 * 4
    from torch.profiler import ProfilerActivity, profile

    def peak(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
        return max(sizes)

    dense = peak(lambda: L.attention_dense(q, k, v, scale=0.25, causal=False, return_weights=False))
    fused = peak(
        lambda: L.attention_fused(q, k, v, scale=0.25, causal=False, return_weights=False, block_q=128, block_k=256)
    )
    assert dense >= 2048 * 2048 * 4
    assert fused <= 4 * tile + 2048 * 16 * 4


@st.composite
def conv_case(draw):
    rank = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = 2 * groups, 2 * groups * draw(st.integers(1, 2))
    k = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    size = tuple(draw(st.integers(5, 7)) for _ in range(rank))
    if transposed:
        pad = tuple(draw(st.integers(0, dilation[i] * (k[i] - 1))) for i in range(rank))
        out_pad = tuple(draw(st.integers(0, max(stride[i], dilation[i]) - 1)) for i in range(rank))
        return dict(
            rank=rank,
            transposed=True,
            groups=groups,
            cin=cin,
            cout=cout,
            k=k,
            stride=stride,
            dilation=dilation,
            size=size,
            padding=tuple((p, p) for p in pad),
            output_padding=out_pad,
            mode="zeros",
        )
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    limit = 2 if mode != "zeros" else 3
    padding = tuple((draw(st.integers(0, limit)), draw(st.integers(0, limit))) for _ in range(rank))
    return dict(
        rank=rank,
        transposed=False,
        groups=groups,
        cin=cin,
        cout=cout,
        k=k,
        stride=stride,
        dilation=dilation,
        size=size,
        padding=padding,
        output_padding=(0,) * rank,
        mode=mode,
    )


def reference_conv(x, w, b, c):
    """float64 F.conv*/conv_transpose* with padding applied explicitly by F.pad."""
    x, w = x.double(), w.double()
    b = None if b is None else b.double()
    r = c["rank"]
    if c["transposed"]:
        fn = [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d][r - 1]
        return fn(x, w, b, c["stride"], [p for p, _ in c["padding"]], c["output_padding"], c["groups"], c["dilation"])
    pads = [p for pair in reversed(c["padding"]) for p in pair]
    xp = F.pad(x, pads, mode="constant" if c["mode"] == "zeros" else c["mode"])
    return [F.conv1d, F.conv2d, F.conv3d][r - 1](xp, w, b, c["stride"], 0, c["dilation"], c["groups"])


@settings(max_examples=60, deadline=None)
@given(conv_case(), st.booleans())
def test_stationary_lowerings_match_float64_reference(c, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c["cin"], *c["size"], generator=g)
    wshape = (
        (c["cin"], c["cout"] // c["groups"], *c["k"])
        if c["transposed"]
        else (c["cout"], c["cin"] // c["groups"], *c["k"])
    )
    w = torch.randn(*wshape, generator=g)
    b = torch.randn(c["cout"], generator=g) if with_bias else None
    try:
        ref = reference_conv(x, w, b, c)
    except RuntimeError:
        return  # torch rejects this configuration (e.g. output too small): nothing to compare
    opts = dict(
        stride=c["stride"],
        padding=c["padding"],
        dilation=c["dilation"],
        groups=c["groups"],
        transposed=c["transposed"],
        output_padding=c["output_padding"],
        padding_mode=c["mode"],
    )
    for fn in (L.conv_dense, L.conv_library):
        out = fn(x, w, b, **opts)
        assert out.shape == ref.shape
        err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert err <= 1e-5, f"{fn.__name__}: relative error {err} for {c}"
