"""Triton ``lowrank`` kernels of ``dot_exp`` on the CPU through the interpreter: against the torch lowering with the
same options (forward and gradients), against exact attention where the factorisation is exact, the generated source
as a snapshot, and a converted GPT-2 that runs and trains on them with no fallback."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import hypothesis  # noqa: E402,F401  (loaded up front: the Triton interpreter walks module members)
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from snapshots import assert_matches_golden  # noqa: E402
from transformers import AttentionInterface, GPT2Config, GPT2Model  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.backends.torch import lowrank as torch_lowrank  # noqa: E402
from itnet_compiler.backends.triton import loader  # noqa: E402
from itnet_compiler.backends.triton import lowrank as tri_lowrank  # noqa: E402
from itnet_compiler.backends.triton.templates import lowrank as templates  # noqa: E402

DEVICE = "cuda" if os.environ.get("ITNET_TEST_GPU") else "cpu"
SCALE = 0.3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(b, h, hkv, lq, lk, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, length, d, generator=gen) for n, length in ((h, lq), (hkv, lk), (hkv, lk)))
    return [t.to(DEVICE, dtype).requires_grad_(True) for t in (q, k, v)]


def _column_mask(b: int, lk: int) -> torch.Tensor:
    """A padding mask (varies over columns only, as low rank needs): batch entry 0 drops its last 5 keys."""
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    keep[0, ..., -5:] = False
    return keep.to(DEVICE)


CASES = [
    # b, h, h_kv, l_q, l_k, d, causal, options, mask
    (2, 2, 1, 37, 37, 16, False, "method=favor,rank=24,seed=3", True),
    (1, 2, 2, 20, 37, 16, False, "method=favor,rank=16,seed=1", False),
    (2, 4, 2, 37, 37, 16, True, "method=favor,rank=16,seed=2,chunk=10,local=0", False),
    (2, 2, 1, 37, 37, 16, True, "method=favor,rank=24,seed=3,chunk=10,local=1", True),
    (1, 2, 2, 40, 40, 24, True, "method=favor,rank=20,seed=0,chunk=16", False),
    (1, 2, 2, 33, 33, 16, True, "method=nystrom,rank=12,seed=0,chunk=16,local=1", False),
    (1, 2, 1, 33, 33, 16, True, "method=learned,rank=12,seed=0,chunk=16,steps=3", False),
]


def _opts(spec: str) -> dict[str, object]:
    return {k: (v if k == "method" else int(v)) for k, v in (kv.split("=") for kv in spec.split(","))}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(",", "_").replace("=", ""))
def test_kernels_match_the_torch_lowering_forward_and_gradients(case):
    b, h, hkv, lq, lk, d, causal, spec, masked = case
    q, k, v = _inputs(b, h, hkv, lq, lk, d, torch.float32)
    mask = _column_mask(b, lk) if masked else None
    opts = _opts(spec)
    out = tri_lowrank.attention_lowrank(q, k, v, mask, scale=SCALE, causal=causal, **opts)
    ref = torch_lowrank.attention_lowrank(q, k, v, mask, scale=SCALE, causal=causal, return_weights=False, **opts)
    assert out.shape == ref.shape and _rel(out, ref) <= 1e-4
    do = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    for name, a, r in zip("qkv", grads, ref_grads, strict=True):
        assert _rel(a, r) <= 1e-4, f"d{name}"


@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_stays_close_to_float32(causal):
    """fp16 inputs (fp32 accumulation inside) against the torch lowering run in float32 on the same values."""
    q, k, v = _inputs(1, 2, 1, 33, 33, 16, torch.float16, seed=5)
    opts = {"method": "favor", "rank": 16, "seed": 4, "chunk": 16}
    out = tri_lowrank.attention_lowrank(q, k, v, None, scale=SCALE, causal=causal, **opts)
    assert out.dtype == torch.float16
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = torch_lowrank.attention_lowrank(q32, k32, v32, scale=SCALE, causal=causal, return_weights=False, **opts)
    assert _rel(out, ref) <= 3e-3
    do = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), do.half())
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do)
    for name, a, r in zip("qkv", grads, ref_grads, strict=True):
        assert _rel(a, r) <= 1e-2, f"d{name}"


def test_exact_where_the_factorisation_is_exact():
    """Independent of the torch lowering: causal with local=1 and one chunk over everything is exact attention, and
    non-causal Nyström with every key a landmark is exact too (both against SDPA in float64, gradients included)."""
    q, k, v = _inputs(1, 2, 2, 24, 24, 16, torch.float32, seed=7)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    do = torch.randn(1, 2, 24, 16, dtype=torch.float64, device=DEVICE)
    for causal, opts in (
        (True, {"method": "favor", "rank": 16, "chunk": 32}),
        (False, {"method": "nystrom", "rank": 24}),
    ):
        out = tri_lowrank.attention_lowrank(q, k, v, None, scale=SCALE, causal=causal, **opts)
        ref = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal, scale=SCALE)
        tol = 1e-5 if causal else 1e-3  # Nyström goes through a pseudo-inverse
        assert _rel(out, ref) <= tol
        grads = torch.autograd.grad(out, (q, k, v), do.float())
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do)
        for name, a, r in zip("qkv", grads, ref_grads, strict=True):
            assert _rel(a, r) <= 10 * tol, f"d{name}"


def test_inputs_outside_the_kernels_are_refused():
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, torch.float32)
    rows = torch.ones(8, 8, dtype=torch.bool).tril()
    assert "query rows" in tri_lowrank.supported(q, k, v, rows)
    assert tri_lowrank.supported(q, k, v, _column_mask(1, 8)) is None
    assert "rank" in tri_lowrank.supported(q, k, v, None, rank=512)
    assert "weights" in tri_lowrank.supported(q, k, v, None, return_weights=True)


def test_inputs_past_the_kernels_offsets_and_grid_are_refused():
    """Offsets inside one b·h slice are 32-bit and b·h is the grid's second axis (at most 65535): larger inputs run
    in torch rather than fault on a card (the interpreter checks neither). Meta tensors: no memory."""

    def meta(*shape):
        return torch.empty(*shape, dtype=torch.float16, device="meta")

    q = meta(64, 32, 2**16, 128)  # B·H·L·D = 2³⁴: past 32 bits as a whole, fine per slice (64-bit bases)
    assert tri_lowrank.supported(q, q, q, None, rank=256) is None
    long = meta(1, 1, 2**24, 128)
    assert "2³¹" in tri_lowrank.supported(long, long, long, None)
    mid = meta(1, 1, 2**23, 64)  # the features' slice: L·rank
    assert tri_lowrank.supported(mid, mid, mid, None, rank=128) is None
    assert "2³¹" in tri_lowrank.supported(mid, mid, mid, None, rank=256)
    wide = meta(2048, 32, 16, 64)
    assert "65535" in tri_lowrank.supported(wide, wide, wide, None)
    kv = meta(1, 4, 16, 64)
    assert "heads" in tri_lowrank.supported(meta(1, 6, 16, 64), kv, kv, None)
    assert "batch" in tri_lowrank.supported(meta(2, 4, 16, 64), kv, kv, None)
    assert "rank" in tri_lowrank.supported(meta(2, 16, 64), kv, kv, None)


def test_generated_source_matches_snapshot_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ITNET_CACHE_DIR", str(tmp_path))
    holes = {
        "TITLE": "dot_exp lowrank (features, prefix sums, backward)",
        "FEATURES": templates.DOT_EXP_FEATURES,
        "KERNEL": templates.DOT_EXP_LOG_KERNEL,
    }
    source = loader.render(templates.LOWRANK, holes)
    assert_matches_golden("dot_exp_lowrank", source)
    loader._LOADED.clear()
    mod = tri_lowrank.kernels()
    path = loader.source_path("dot_exp_lowrank", source)
    assert path.parent == tmp_path / "triton" and path.read_text() == source
    assert mod.__file__ == str(path)
    assert tri_lowrank.kernels() is mod
    with pytest.raises(KeyError, match="unfilled"):
        loader.render(templates.LOWRANK, {"TITLE": "x", "KERNEL": templates.DOT_EXP_LOG_KERNEL})


# A GPT-2 whose attention is SDPA with is_causal=True (what transformers runs eagerly without padding), so the
# converted layers carry causal support rather than a materialised mask.
AttentionInterface.register("sdpa_causal", sdpa_attention_forward)
AttentionMaskInterface.register("sdpa_causal", lambda *args, **kwargs: None)


PLAN = {"*": "lowrank:method=favor,rank=16,seed=1,chunk=16"}
_GPT2: dict[str, object] = {}


def _gpt2():
    """A converted 2-layer GPT-2 (converted once per module) and its example input."""
    if not _GPT2:
        torch.manual_seed(0)
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, use_cache=False,
                         attn_implementation="sdpa_causal")  # fmt: skip
        model = GPT2Model(cfg).eval()
        args = (torch.randint(0, 100, (2, 40)),)
        _GPT2.update(model=model, args=args, prog=itc.convert(model, args))
    return _GPT2["model"], _GPT2["args"], _GPT2["prog"]


def test_gpt2_runs_and_trains_on_the_lowrank_kernels():
    model, args, prog = _gpt2()
    assert [t.attrs.support for t in prog.transforms] == ["causal"] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback warns: it would fail here
        tri = itc.build(prog, backend="triton", plan=PLAN)
        out = tri(*args)
    ref_mod = itc.build(prog, backend="torch", plan=PLAN)
    ref = ref_mod(*args)
    assert tri.fallbacks == {}
    assert all(t.lowering.startswith("lowrank") for t in tri.program.transforms)
    assert _rel(out[0], ref[0]) <= 1e-5
    assert _rel(ref[0], model(*args)[0]) > 1e-4  # the plan is really approximate: the comparison is not vacuous
    r = torch.randn_like(ref[0])
    names = [n for n, _ in tri.gm.named_parameters()]
    ref_params = dict(ref_mod.gm.named_parameters())
    grads = torch.autograd.grad((out[0] * r).sum(), list(tri.gm.parameters()), allow_unused=True)
    ref_grads = torch.autograd.grad((ref[0] * r).sum(), [ref_params[n] for n in names], allow_unused=True)
    checked = 0
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item(), msg=name)
        checked += 1
    assert checked >= len(names) - 1 and any(".attn." in n for n in names)


def test_a_failing_kernel_falls_back_to_the_torch_lowering_with_the_same_options(monkeypatch):
    """The lowering's options are semantic: the fallback must run lowrank with them, not with the defaults."""
    model, args, prog = _gpt2()

    def broken(*a, **k):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(tri_lowrank, "attention_lowrank", broken)
    with pytest.warns(UserWarning, match="kernel failed"):
        tri = itc.build(prog, backend="triton", plan=PLAN)
        out = tri(*args)[0]
    assert sorted(tri.fallbacks) == ["h.0.attn", "h.1.attn"]
    ref = itc.build(prog, backend="torch", plan=PLAN)(*args)[0]
    default = itc.build(prog, backend="torch", plan={"*": "lowrank"})(*args)[0]
    assert _rel(out, ref) <= 1e-6 and _rel(out, default) > 1e-4
