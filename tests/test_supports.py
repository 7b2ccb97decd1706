"""Attention supports: the window(r) sliding window in the IR, the torch lowerings and the Triton kernel; constant
masks folded into supports (a real Mistral with a sliding window, GPT-2); mask block sparsity in the backward."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import hypothesis  # noqa: E402,F401  (loaded up front: the Triton interpreter walks module members)
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import GPT2Config, GPT2Model, MistralConfig, MistralModel  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.backends.torch import attention as torch_attn  # noqa: E402
from itnet_compiler.backends.triton import attention as tri_attn  # noqa: E402
from itnet_compiler.ir.families import DotExpAttrs  # noqa: E402

DEVICE = "cuda" if os.environ.get("ITNET_TEST_GPU") else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _window_mask(lq: int, lk: int, r: int) -> torch.Tensor:
    """The sliding window written out pair by pair (independent of the lowerings' arange arithmetic)."""
    keep = torch.zeros(lq, lk, dtype=torch.bool)
    for i in range(lq):
        for j in range(lk):
            keep[i, j] = j <= i and i - j < r
    return keep


def _reference(q, k, v, mask, r, scale):
    """SDPA in float64 on the explicit mask (window and, if given, the layer's own mask)."""
    keep = _window_mask(q.shape[2], k.shape[2], r)
    if mask is None:
        full = keep
    elif mask.dtype == torch.bool:
        full = keep & mask
    else:
        full = mask.double().masked_fill(~keep, float("-inf"))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=full, scale=scale)


WINDOW_CASES = [
    # b, h, h_kv, l_q, l_k, d, r, mask
    (1, 2, 1, 37, 37, 16, 5, None),
    (2, 2, 2, 50, 50, 32, 16, None),
    (1, 2, 2, 40, 40, 16, 3, "bool"),
    (1, 1, 1, 33, 33, 16, 100, "additive"),
    (1, 2, 2, 20, 45, 16, 7, None),  # fewer rows than columns: top-left aligned like SDPA's is_causal
    (1, 1, 1, 30, 8, 16, 3, None),  # rows past L_k + r - 1 admit no column: output 0, finite gradients
]


def _inputs(case, dtype, seed=0):
    b, h, hkv, lq, lk, d, r, mask = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    m = None
    if mask == "bool":
        m = torch.rand(lq, lk, generator=g) > 0.3
        m[:, 0] = True
        m.diagonal().fill_(True)
    elif mask == "additive":
        m = torch.randn(lq, lk, generator=g, dtype=torch.float64)
    return q, k, v, m


@pytest.mark.parametrize("lowering", ["dense", "fused", "library"])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "-".join(map(str, c)))
def test_torch_lowerings_of_a_window_support_match_sdpa_on_the_explicit_mask(case, lowering):
    q, k, v, m = _inputs(case, torch.float64)
    r, scale = case[6], case[5] ** -0.5
    fn = {"dense": torch_attn.attention_dense, "library": torch_attn.attention_library,
          "fused": lambda *a, **kw: torch_attn.attention_fused(*a, block_q=8, block_k=16, **kw)}[lowering]  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, m, scale=scale, causal=True, return_weights=False, window=r)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _reference(*ref_leaves, m, r, scale)
    assert _rel(out, ref) <= 1e-12
    do = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, ref_leaves, do), strict=True):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_kernel_with_a_window_support_forward_and_gradients(case, dtype):
    q, k, v, m = _inputs(case, dtype)
    r, scale = case[6], case[5] ** -0.5
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
    mask = m.to(DEVICE, dtype) if m is not None and m.is_floating_point() else (m.to(DEVICE) if m is not None else None)
    out = tri_attn.fused_attention(*leaves, mask, scale=scale, causal=True, window=r)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _reference(*ref_leaves, m, r, scale)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert _rel(out, ref) <= tol
    do = torch.randn(ref.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, do.to(DEVICE, dtype))
    for name, a, b in zip("qkv", grads, torch.autograd.grad(ref, ref_leaves, do), strict=True):
        assert (a.double().cpu() - b).abs().max() <= tol * max(1.0, b.abs().max().item()), f"d{name}"


@pytest.mark.parametrize("causal", [False, True])
def test_every_kernel_skips_tiles_a_mask_rules_out_forward_and_backward(causal):
    """Keys 16..31 are masked for every row and hold NaN: a kernel that visited their tiles (forward, dQ or dK/dV)
    would spread the NaN (0 · NaN is NaN), so finite results equal to the reference prove the tiles are skipped."""
    b, h, n, d = 2, 2, 48, 16
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[:, 16:32] = False
    k[:, :, 16:32] = float("nan")
    v[:, :, 16:32] = float("nan")
    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    out = tri_attn.fused_attention(*leaves, mask.to(DEVICE), scale=0.25, causal=causal, block_m=16, block_n=16,
                                   bwd_block_m=16, bwd_block_n=16)  # fmt: skip
    keep = torch.cat([torch.arange(16), torch.arange(32, n)])
    ref_leaves = [t[:, :, keep].double().requires_grad_() if i else t.double().requires_grad_()
                  for i, t in enumerate((q, k, v))]  # fmt: skip
    causal_keep = keep[None, :] <= torch.arange(n)[:, None] if causal else None
    ref = F.scaled_dot_product_attention(*ref_leaves, attn_mask=causal_keep, scale=0.25)
    if causal:  # rows 16..31 see only masked keys besides 0..15; rows before 16 are as usual
        assert torch.isfinite(ref).all()
    assert torch.isfinite(out).all() and _rel(out, ref) <= 1e-5
    do = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    dq, dk, dv = torch.autograd.grad(out, leaves, do.float().to(DEVICE))
    rq, rk, rv = torch.autograd.grad(ref, ref_leaves, do)
    assert torch.isfinite(dq).all() and _rel(dq, rq) <= 1e-5
    assert _rel(dk[:, :, keep], rk) <= 1e-5 and _rel(dv[:, :, keep], rv) <= 1e-5
    assert dk[:, :, 16:32].abs().max().item() == 0.0 and dv[:, :, 16:32].abs().max().item() == 0.0


def test_ir_window_support_prints_parses_and_is_checked():
    attrs = DotExpAttrs(heads=2, kv_heads=2, scale=0.5, support="window(4)")
    assert attrs.window == 4 and attrs.causal
    assert DotExpAttrs(support="causal").window == 0 and not DotExpAttrs().causal
    from itnet_compiler.ir.lowering import REGISTRY

    assert REGISTRY[("dot_exp", "montecarlo")].why_not(attrs) is not None
    assert REGISTRY[("dot_exp", "fused")].why_not(attrs) is None
    text = """itir 1
input %q : f32[1,2,8,4]
input %k : f32[1,2,8,4]
input %v : f32[1,2,8,4]
%o = it.transform(q=%q, k=%k, v=%v) {family="dot_exp", heads=2, kv_heads=2, scale=0.5, support="window(0)"} : f32[1,2,8,4] @"attn"
output %o
"""  # noqa: E501
    with pytest.raises(Exception, match="window"):
        itc.parse(text)
    prog = itc.parse(text.replace("window(0)", "window(3)"))
    assert prog.transforms[0].attrs.window == 3 and itc.parse(str(prog)).transforms[0].attrs.window == 3
    # the cost model counts the window's work: the pairs it admits, counted one by one
    pairs = int(_window_mask(8, 8, 3).sum())
    assert int(prog.transforms[0].attrs.flops(prog.transforms[0])) == 2 * 2 * pairs * (4 + 4)
    from itnet_compiler.ir.cost import cost_of

    node = prog.transforms[0]
    assert float(cost_of(node, "fused").flops) < float(cost_of(node, "library").flops)  # SDPA computes every pair
    wide = prog.transforms[0].attrs.replace(support="window(100)")  # wider than the sequence: the causal triangle
    assert int(wide.flops(prog.transforms[0])) == 2 * 2 * int(_window_mask(8, 8, 100).sum()) * (4 + 4)


def _mistral(window: int):
    torch.manual_seed(0)
    cfg = MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, vocab_size=100, sliding_window=window, use_cache=False,
                        attn_implementation="sdpa")  # fmt: skip
    return MistralModel(cfg).eval(), (torch.randint(0, 100, (2, 24)),)


def test_mistral_sliding_window_mask_becomes_a_window_support_and_runs_on_triton():
    model, args = _mistral(window=5)
    prog = itc.convert(model, args)
    assert [t.attrs.support for t in prog.transforms] == ["window(5)"] * 2
    assert all(t.attrs.mask == "none" and "mask" not in t.kwargs for t in prog.transforms)
    assert "aten.cumsum" not in str(prog)  # the mask's computation is gone with it
    ref = model(*args).last_hidden_state
    assert _rel(itc.build(prog)(*args).last_hidden_state, ref) <= 1e-5
    mod = itc.build(prog, backend="triton")
    assert mod.fallbacks == {} and [t.lowering for t in mod.program.transforms] == ["fused"] * 2
    out = mod(*args).last_hidden_state
    assert _rel(out, ref) <= 1e-5
    r = torch.randn_like(ref)
    (out * r).sum().backward()
    (ref * r).sum().backward()
    ref_params = dict(model.named_parameters())
    scale = max(p.grad.abs().max().item() for p in ref_params.values() if p.grad is not None)
    for name, p in mod.gm.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5 * scale)


def test_a_causal_lm_mask_folds_to_causal_and_padding_masks_stay_masks():
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64, use_cache=False,
                     attn_implementation="eager")  # fmt: skip
    model = GPT2Model(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    prog = itc.convert(model, (ids,))
    assert [t.attrs.support for t in prog.transforms] == ["causal"]
    assert _rel(itc.build(prog)(ids).last_hidden_state, model(ids).last_hidden_state) <= 1e-5
    pad = torch.ones(2, 12, dtype=torch.long)
    pad[1, 8:] = 0  # a padding mask reads an input: it must stay a mask input
    prog = itc.convert(model, (ids,), {"attention_mask": pad})
    assert prog.transforms[0].attrs.mask != "none"
    pad2 = pad.clone()
    pad2[0, 10:] = 0
    out = itc.build(prog)(ids, attention_mask=pad2).last_hidden_state
    ref = model(ids, attention_mask=pad2).last_hidden_state
    assert _rel(out[pad2.bool()], ref[pad2.bool()]) <= 1e-5


def test_attention_past_the_kernel_grid_is_refused_with_a_reason():
    q = torch.empty(1024, 65, 8, 16, device="meta")
    assert "65535" in tri_attn.supported(q, q, q, None)
    q = torch.empty(1023, 64, 8, 16, device="meta")  # 65472 programs on the axis
    assert tri_attn.supported(q, q, q, None) is None


def test_a_half_precision_causal_mask_written_with_the_dtype_minimum_folds_to_causal():
    """HF's float16 masks hold finfo(float16).min (-65504), not -inf: still nothing admitted, so still a support."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64, use_cache=False,
                     attn_implementation="eager")  # fmt: skip
    model = GPT2Model(cfg).eval().half()
    ids = torch.randint(0, 100, (2, 12))
    prog = itc.convert(model, (ids,))
    assert [(t.attrs.support, t.attrs.mask) for t in prog.transforms] == [("causal", "none")]
    assert _rel(itc.build(prog)(ids).last_hidden_state, model(ids).last_hidden_state) <= 2e-3


class _InPlaceMask(torch.nn.Module):
    """A constant mask written through a view (``m[:, 3:] = False`` exports as a slice and a ``fill_``)."""

    def forward(self, q, k, v):
        m = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
        m[:, 3:] = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


class _BufferMask(torch.nn.Module):
    """A causal mask kept in a buffer: ``load_state_dict`` may replace it, so it must stay a mask input."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("keep", torch.ones(n, n, dtype=torch.bool).tril())

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep)


def test_masks_written_in_place_or_kept_in_buffers_are_not_folded():
    q, k, v = (torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    model = _InPlaceMask()
    prog = itc.convert(model, (q, k, v))
    assert prog.transforms[0].attrs.mask == "bool"
    assert _rel(itc.build(prog)(q, k, v), model(q, k, v)) <= 1e-6
    model = _BufferMask(8)
    mod = itc.build(itc.convert(model, (q, k, v)))
    assert mod.program.transforms[0].attrs.mask == "bool"
    full = {"keep": torch.ones(8, 8, dtype=torch.bool)}
    model.load_state_dict(full)
    mod.gm.load_state_dict(full)
    assert _rel(mod(q, k, v), model(q, k, v)) <= 1e-6


class _Memory(torch.nn.Module):
    """Queries of a dynamic length attend to a fixed memory under a constant [1, 6] mask."""

    def __init__(self) -> None:
        super().__init__()
        self.mem = torch.nn.Parameter(torch.randn(1, 2, 6, 4))

    def forward(self, q):
        keep = torch.ones(1, 6, dtype=torch.bool)
        return F.scaled_dot_product_attention(q, self.mem, self.mem, attn_mask=keep)


def test_a_constant_mask_over_a_dynamic_length_converts_and_stays_exact():
    model = _Memory()
    q = torch.randn(1, 2, 5, 4)
    prog = itc.convert(model, (q,), dynamic_shapes=({2: torch.export.Dim("L", min=2, max=64)},))
    q2 = torch.randn(1, 2, 9, 4)
    assert _rel(itc.build(prog)(q2), model(q2)) <= 1e-6


class _UnbindMask(torch.nn.Module):
    """A mask taken from a one-element ``unbind`` (a list-returning op with a single IR output)."""

    def forward(self, q, k, v, pad):
        i = torch.arange(q.shape[2])
        causal = (i[None, :] <= i[:, None])[None].unbind(0)[0]
        m = (causal & pad[:, None, None, :])[None].unbind(0)[0]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def test_a_mask_from_a_single_element_unbind_builds_and_matches_eager():
    q, k, v = (torch.randn(2, 2, 8, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[1, 6:] = False
    model = _UnbindMask()
    prog = itc.convert(model, (q, k, v, pad))
    assert prog.transforms[0].attrs.mask == "bool"  # it reads an input: stays a mask
    assert _rel(itc.build(prog)(q, k, v, pad), model(q, k, v, pad)) <= 1e-6
