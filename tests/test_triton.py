"""Triton backend on the CPU through the interpreter: kernels against float64 references, generated sources as
snapshots, fallbacks, and real models end to end (forward and one training step)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import hypothesis  # noqa: E402,F401  (loaded up front: the Triton interpreter walks module members)
import pytest  # noqa: E402
import torch  # noqa: E402
from snapshots import assert_matches_golden  # noqa: E402
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.backends.torch.attention import attention_dense  # noqa: E402
from itnet_compiler.backends.triton import attention as tri_attn  # noqa: E402
from itnet_compiler.backends.triton import loader, templates  # noqa: E402
from itnet_compiler.backends.triton.score_mod import ModSpec  # noqa: E402
from itnet_compiler.backends.triton.score_mod import holes as score_holes  # noqa: E402

DEVICE = "cuda" if os.environ.get("ITNET_TEST_GPU") else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [
    # b, h, h_kv, l_q, l_k, d, causal, mask
    (1, 2, 2, 40, 40, 16, False, None),
    (2, 4, 2, 33, 33, 32, True, None),
    (1, 2, 1, 20, 37, 24, False, "bool"),
    (1, 3, 3, 32, 32, 16, True, "additive"),
    (2, 2, 2, 17, 17, 64, False, "row"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_attention_forward_and_gradients(case, dtype):
    b, h, hkv, lq, lk, d, causal, mask_kind = case
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, hh, n, d, generator=g) for hh, n in ((h, lq), (hkv, lk), (hkv, lk)))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, lq, lk, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "additive":
        mask = torch.randn(b, h, lq, lk, generator=g)
    elif mask_kind == "row":
        mask = torch.randn(lq, lk, generator=g)
    do = torch.randn(b, h, lq, d, generator=g)
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
    dmask = None if mask is None else mask.to(DEVICE)
    out = tri_attn.fused_attention(*leaves, dmask, scale=d**-0.5, causal=causal)
    grads = torch.autograd.grad(out, leaves, do.to(DEVICE, dtype))
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_mask = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    ref = attention_dense(*ref_leaves, ref_mask, scale=d**-0.5, causal=causal, return_weights=False)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
    tol = 1e-4 if dtype == torch.float32 else 3e-3
    assert _rel(out.cpu(), ref) <= tol
    for name, a, r in zip("qkv", grads, ref_grads, strict=True):
        assert _rel(a.cpu(), r) <= tol, f"d{name}"


def test_generated_source_matches_snapshot_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ITNET_CACHE_DIR", str(tmp_path))
    holes = {"TITLE": "dot_exp fused attention", **score_holes(None, templates.DOT_EXP_KERNEL)}
    source = loader.render(templates.ATTENTION, holes)
    assert_matches_golden("dot_exp_fused", source)
    # a score modification (softcap over a bias that needs a gradient, a boolean fill) inlined into every kernel
    spec = ModSpec("where(t1, (-3.4028234663852886e+38), tanh((s + t0) / 30.0) * 30.0)", (False, True), (True, False))
    modded = loader.render(
        templates.ATTENTION, {"TITLE": "dot_exp fused attention", **score_holes(spec, templates.DOT_EXP_KERNEL)}
    )
    assert_matches_golden("dot_exp_fused_score_mod", modded)
    loader._LOADED.clear()
    mod = loader.load("dot_exp_fused", source)
    path = loader.source_path("dot_exp_fused", source)
    assert path.parent == tmp_path / "triton" and path.read_text() == source
    assert mod.__file__ == str(path)
    assert loader.load("dot_exp_fused", source) is mod
    with pytest.raises(KeyError, match="unfilled"):
        loader.render(templates.ATTENTION, {"TITLE": "x"})


RENDERED = {
    "stationary_depthwise": ("DEPTHWISE", "stationary depthwise direct", "STATIONARY_DEPTHWISE_KERNEL"),
    "stationary_gemm": ("IMPLICIT_GEMM", "stationary implicit GEMM", "STATIONARY_GEMM_KERNEL"),
    "ssm_scan": ("SSM_SCAN", "ssm selective scan", "SSM_KERNEL"),
    "gated_lstm": ("LSTM_SCAN", "gated LSTM scan", "LSTM_KERNEL"),
    "gated_gru": ("GRU_SCAN", "gated GRU scan", "GRU_KERNEL"),
}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_every_family_kernel_matches_its_snapshot(name):
    """The sources the backend loads are the snapshots (rendered exactly as the backend modules render them)."""
    from itnet_compiler.backends.triton import conv, gated, ssm

    loaders = {"stationary_depthwise": conv.kernels, "stationary_gemm": conv.gemm_kernels, "ssm_scan": ssm.kernels,
               "gated_lstm": gated.kernels, "gated_gru": gated.gru_kernels}  # fmt: skip
    template, title, kernel = RENDERED[name]
    source = loader.render(getattr(templates, template), {"TITLE": title, "KERNEL": getattr(templates, kernel)})
    assert_matches_golden(name, source)
    assert open(loaders[name]().__file__).read() == source


def test_debug_level_3_prints_generated_source(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ITNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ITNET_DEBUG", "3")
    loader._LOADED.clear()
    tri_attn.kernels()
    err = capsys.readouterr().err
    assert "def attention_fwd" in err and "tl.dot(q, kT" in err


def _bert():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, attn_implementation="eager")  # fmt: skip
    return BertModel(cfg).eval(), (torch.randint(0, 100, (2, 16)),)


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, use_cache=False,
                     attn_implementation="sdpa")  # fmt: skip
    return GPT2Model(cfg).eval(), (torch.randint(0, 100, (2, 16)),)


def _leaves(out) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("factory", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_real_model_runs_and_trains_on_triton(factory):
    model, args = factory()
    prog = itc.convert(model, args)
    mod = itc.build(prog, backend="triton")
    assert [t.lowering for t in mod.program.transforms] == ["fused"] * len(prog.transforms)
    assert mod.fallbacks == {}
    out, ref = mod(*args), model(*args)
    assert type(out) is type(ref)
    for a, r in zip(_leaves(out), _leaves(ref), strict=True):
        assert _rel(a, r) <= 1e-5
    # one training step: same gradients as eager for every parameter
    r = torch.randn_like(_leaves(ref)[0])
    (_leaves(out)[0] * r).sum().backward()
    (_leaves(ref)[0] * r).sum().backward()
    ref_grads = dict(model.named_parameters())
    scale = max(p.grad.abs().max().item() for p in ref_grads.values() if p.grad is not None)
    checked = 0
    for name, p in mod.gm.named_parameters():
        if p.grad is None:
            continue
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-5 * scale)
        checked += 1
    assert checked >= len(ref_grads) - 2  # the pooler does not feed the first output


def test_failing_kernel_falls_back_with_one_warning_and_is_recorded(monkeypatch):
    model, args = _bert()
    prog = itc.convert(model, args)

    def broken(*a, **k):
        raise RuntimeError("PTX assembly failed\nsecond line")

    monkeypatch.setattr(tri_attn, "fused_attention", broken)
    mod = itc.build(prog, backend="triton", plan={"encoder.layer.1.*": "dense"})
    with pytest.warns(UserWarning, match="layer 'encoder.layer.0.attention.self' runs on the torch backend") as rec:
        out = mod(*args)
        mod(*args)
    assert len(rec) == 1
    assert mod.fallbacks == {"encoder.layer.0.attention.self": "kernel failed (RuntimeError: PTX assembly failed)"}
    assert mod.program.meta["fallbacks"] == mod.fallbacks
    assert _rel(out.last_hidden_state, model(*args).last_hidden_state) <= 1e-5


def test_layer_returning_weights_keeps_an_exact_lowering_that_materialises_them():
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    prog = itc.convert(mha, (x, x, x))
    (t,) = prog.transforms
    assert t.attrs.return_weights
    mod = itc.build(prog, backend="triton", plan={"*": "fused"})
    assert [n.lowering for n in mod.program.transforms] == ["library"]
    for a, r in zip(_leaves(mod(x, x, x)), _leaves(mha(x, x, x)), strict=True):
        assert _rel(a, r) <= 1e-5
    with pytest.raises(itc.ItnetError, match="returns its attention weights"):
        itc.build(prog, backend="triton", plan={t.layer: "fused"})


CONV_CASES = [
    # rank, c_in, c_out, size, kernel, stride, dilation, padding, groups, transposed, output_padding, mode
    (1, 6, 6, (20,), (4,), (1,), (1,), ((3, 0),), 6, False, (0,), "zeros"),  # depthwise causal (Mamba)
    (2, 4, 4, (9, 7), (3, 2), (2, 1), (1, 2), ((1, 1), (2, 0)), 4, False, (0, 0), "zeros"),  # depthwise 2-d
    (2, 4, 4, (8, 8), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 4, False, (0, 0), "reflect"),
    (2, 4, 6, (9, 8), (3, 3), (2, 1), (1, 2), ((1, 1), (2, 2)), 2, False, (0, 0), "zeros"),  # grouped, dilated
    (1, 3, 5, (13,), (4,), (2,), (1,), ((1, 2),), 1, False, (0,), "circular"),
    (2, 4, 6, (5, 6), (3, 3), (2, 2), (1, 1), ((1, 1), (1, 1)), 2, True, (1, 0), "zeros"),  # transposed
    (1, 4, 4, (7,), (3,), (3,), (2,), ((1, 1),), 1, True, (2,), "zeros"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"r{c[0]}-g{c[8]}-t{int(c[9])}-{c[11]}")
def test_stationary_kernels_forward_and_gradients(case, dtype):
    from itnet_compiler.backends.torch.conv import conv_library
    from itnet_compiler.backends.triton import conv as tri_conv

    rank, cin, cout, size, k, s, d, pad, groups, transposed, op, mode = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, *size, generator=g)
    wshape = (cin, cout // groups, *k) if transposed else (cout, cin // groups, *k)
    w = torch.randn(*wshape, generator=g) * 0.5
    b = torch.randn(cout, generator=g)
    static = dict(stride=s, padding=pad, dilation=d, groups=groups, transposed=transposed, output_padding=op,
                  padding_mode=mode)  # fmt: skip
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (x, w, b)]
    y = tri_conv.stationary_conv(*leaves, **static)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b)]
    ref = conv_library(*ref_leaves, **static)
    dy = torch.randn(ref.shape, generator=g)
    grads = torch.autograd.grad(y, leaves, dy.to(DEVICE, dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert y.shape == ref.shape and _rel(y.cpu(), ref) <= tol
    for name, a, r in zip(("dx", "dw", "db"), grads, ref_grads, strict=True):
        assert _rel(a.cpu(), r) <= tol, name


def test_cnn_runs_and_trains_on_triton_with_no_fallback():
    import importlib.util
    import warnings
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("cnn", Path(__file__).parents[1] / "examples" / "cnn.py")
    cnn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cnn)
    torch.manual_seed(0)
    model = cnn.VariantCNN().eval()
    args = (torch.randn(1, 3, 12, 12), torch.randn(1, 1, 4, 4, 4))
    prog = itc.convert(model, args)
    mod = itc.build(prog, backend="triton")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "layer .* runs on the torch backend")  # the 3-d layer 'vol' included
        out = mod(*args)
    ref = model(*args)
    assert _rel(out, ref) <= 1e-5
    assert mod.fallbacks == {}
    r = torch.randn_like(ref)
    (out * r).sum().backward()
    (ref * r).sum().backward()
    ref_params = dict(model.named_parameters())
    for name, p in mod.gm.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5)


SSM_CASES = [
    # batch, length, heads, head_dim, groups, state, selective, A per state, softplus, D, dt_bias, h0
    (2, 9, 4, 1, 1, 5, True, True, True, True, True, False),  # Mamba layout
    (1, 7, 4, 3, 2, 4, True, False, True, True, False, True),  # Mamba2 layout: scalar A per head, groups
    (2, 6, 2, 2, 1, 3, False, True, False, False, False, False),  # time-invariant (S4D-like, real)
]


@pytest.mark.parametrize("sequential", [False, True], ids=["chunked-assoc-scan", "sequential"])
@pytest.mark.parametrize("case", SSM_CASES, ids=lambda c: f"L{c[1]}-H{c[2]}-P{c[3]}-G{c[4]}-sel{int(c[6])}")
def test_ssm_scan_kernel_forward_state_and_gradients(case, sequential, monkeypatch):
    import math

    from itnet_compiler.backends.torch.recurrent import ssm_dense
    from itnet_compiler.backends.triton import ssm as tri_ssm

    monkeypatch.setattr(tri_ssm, "SEQUENTIAL_ONLY", sequential)
    bsz, L, H, P, G, N, sel, a2, soft, has_d, has_bias, has_h0 = case
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    ins = [
        rnd(bsz, L, H, P),
        rnd(bsz, L, H, scale=0.5) if sel else torch.rand(H, generator=g, dtype=torch.float64) * 0.5,
        -torch.rand(H, N, generator=g, dtype=torch.float64) if a2 else -torch.rand(H, generator=g, dtype=torch.float64),
        rnd(bsz, L, G, N) if sel else rnd(G, N),
        rnd(bsz, L, G, N) if sel else rnd(G, N),
        rnd(H) if has_d else None,
        rnd(H, scale=0.1) if has_bias else None,
        rnd(bsz, H, P, N) if has_h0 else None,
    ]
    kw = dict(dt_softplus=soft, dt_min=0.0 if soft else -math.inf, dt_max=math.inf, return_state=True)
    ref_leaves = [None if t is None else t.clone().requires_grad_() for t in ins]
    leaves = [None if t is None else t.float().to(DEVICE).requires_grad_() for t in ins]
    y_ref, h_ref = ssm_dense(*ref_leaves, **kw)
    y, h = tri_ssm.ssm_scan(*leaves, **kw)
    dy, dh = torch.randn(y_ref.shape, generator=g, dtype=torch.float64), torch.randn(h_ref.shape, generator=g,
                                                                                     dtype=torch.float64)  # fmt: skip
    assert _rel(y.cpu(), y_ref) <= 1e-5 and _rel(h.cpu(), h_ref) <= 1e-5
    grads = torch.autograd.grad((y * dy.float().to(DEVICE)).sum() + (h * dh.float().to(DEVICE)).sum(),
                                [t for t in leaves if t is not None])  # fmt: skip
    ref_grads = torch.autograd.grad((y_ref * dy).sum() + (h_ref * dh).sum(), [t for t in ref_leaves if t is not None])
    for a, r in zip(grads, ref_grads, strict=True):
        assert _rel(a.cpu(), r) <= 1e-5


GATED_CASES = [
    # cell, layers, bidirectional, batch_first, bias, batch, length, input, hidden, initial states
    ("lstm", 2, True, True, True, 3, 7, 5, 6, True),
    ("lstm", 1, False, False, False, 2, 5, 4, 20, False),
    ("gru", 2, True, True, True, 3, 7, 5, 6, True),
    ("gru", 1, False, False, False, 2, 5, 4, 20, False),
]


@pytest.mark.parametrize("case", GATED_CASES, ids=lambda c: f"{c[0]}-L{c[1]}-bi{int(c[2])}-H{c[8]}")
def test_gated_scan_kernels_match_torch_rnn(case):
    from itnet_compiler.backends.triton import gated as tri_gated

    cell, layers, bidir, bf, bias, b, t, i, h, init = case
    torch.manual_seed(0)
    cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    rnn = cls(i, h, num_layers=layers, bidirectional=bidir, batch_first=bf, bias=bias).double()
    x = torch.randn(b, t, i, dtype=torch.float64) if bf else torch.randn(t, b, i, dtype=torch.float64)
    states = [torch.randn(layers * (1 + bidir), b, h, dtype=torch.float64) for _ in range(2)] if init else [None, None]
    x_ref = x.clone().requires_grad_()
    hx = (tuple(states) if cell == "lstm" else states[0]) if init else None
    y_ref, hn_ref = rnn(x_ref, hx)
    refs = [y_ref, *(hn_ref if cell == "lstm" else (hn_ref,))]
    weights = [w.detach().float().to(DEVICE).requires_grad_() for w in rnn._flat_weights]
    xs = x.float().to(DEVICE).requires_grad_()
    h0, c0 = (None if s is None else s.float().to(DEVICE) for s in states)
    outs = tri_gated.gated_scan(xs, weights, h0, c0 if cell == "lstm" else None, cell=cell, hidden_size=h, proj_size=0,
                                num_layers=layers, bidirectional=bidir, batch_first=bf, bias=bias)  # fmt: skip
    cots = [torch.randn_like(r) for r in refs]
    for out, ref in zip(outs, refs, strict=True):
        assert _rel(out.cpu(), ref) <= 1e-5
    loss = sum((o * c.float().to(DEVICE)).sum() for o, c in zip(outs, cots, strict=True))
    ref_loss = sum((r * c).sum() for r, c in zip(refs, cots, strict=True))
    grads = torch.autograd.grad(loss, [xs, *weights])
    ref_grads = torch.autograd.grad(ref_loss, [x_ref, *rnn._flat_weights])
    for a, r in zip(grads, ref_grads, strict=True):
        assert _rel(a.cpu(), r) <= 1e-5


def test_mamba_and_lstm_models_run_and_train_on_triton():
    from transformers import MambaConfig, MambaModel

    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=50, intermediate_size=32,
                      use_cache=False, initializer_range=0.2)  # fmt: skip
    mamba = MambaModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 12))

    class Rnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True)
            self.gru = torch.nn.GRU(16, 5, batch_first=True)

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.gru(y)[0]

    for model, args in ((mamba, (ids,)), (Rnn().eval(), (torch.randn(3, 9, 6),))):
        prog = itc.convert(model, args)
        mod = itc.build(prog, backend="triton")
        assert mod.fallbacks == {}
        lowerings = {(t.family, t.lowering) for t in mod.program.transforms}
        assert lowerings <= {("stationary", "fused"), ("ssm", "scan"), ("gated", "scan")}
        out, ref = _leaves(mod(*args))[0], _leaves(model(*args))[0]
        assert _rel(out, ref) <= 1e-5
        r = torch.randn_like(ref)
        (out * r).sum().backward()
        (ref * r).sum().backward()
        ref_params = dict(model.named_parameters())
        scale = max(p.grad.abs().max().item() for p in ref_params.values() if p.grad is not None)
        for name, p in mod.gm.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("causal", [False, True])
def test_tiles_a_mask_rules_out_are_skipped_and_the_answer_is_unchanged(causal):
    """Document masking (block-diagonal): whole tiles are dead, the kernel skips them, results equal the reference."""
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 2, 48, 16
    doc = torch.arange(n) // 16  # three documents of 16 tokens
    mask = (doc[:, None] == doc[None, :]).expand(b, 1, n, n).clone()
    mask[1, :, 40:, :] = False  # and some fully masked rows: they attend to nothing (output 0)
    blocks = tri_attn.live_tiles(mask.to(DEVICE), (b, h, n, n), 16, 16)
    assert blocks is not None and int((blocks == 0).sum()) > 0
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    out = tri_attn.fused_attention(*leaves, mask.to(DEVICE), scale=0.25, causal=causal, block_m=16, block_n=16)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_dense(*ref_leaves, mask, scale=0.25, causal=causal, return_weights=False)
    assert _rel(out.cpu(), ref) <= 1e-5
    assert out[1, :, 40:].abs().max().item() == 0.0
    do = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, do.float().to(DEVICE))
    for a, r in zip(grads, torch.autograd.grad(ref, ref_leaves, do), strict=True):
        assert _rel(a.cpu(), r) <= 1e-5
