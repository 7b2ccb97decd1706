"""Score modifications: the expression between q·kᵀ and the softmax recovered from eager code (ALiBi, relative
position terms, DeBERTa's disentangled terms, finfo.min fills, tanh softcapping, a scale after a bias, einsum and
3-d/4-d/5-d layouts), stored in the ``dot_exp`` node, printed and parsed, run by the torch lowerings and inlined
into the Triton kernels forward and backward (interpreter here, no fallback)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402
from torch import nn  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.backends.torch.attention import attention_dense  # noqa: E402
from itnet_compiler.backends.triton.attention import fused_attention  # noqa: E402
from itnet_compiler.errors import ItnetError  # noqa: E402
from itnet_compiler.ir import score_mod as sm  # noqa: E402


# ------------------------------------------------------------------------------------------------ the expression
@pytest.mark.parametrize(
    "text",
    ["tanh(s / 50.0) * 50.0", "where(t1, (-3.4028234663852886e+38), s + t0)", "(s + t0 + t1) * 0.125",
     "s * exp(-s) / (1.0 + t0)", "s + (i - j) * 0.5 + h - b"],
)  # fmt: skip
def test_expression_text_round_trips_and_derivatives_match_autograd(text: str) -> None:
    e = sm.parse(text)
    assert sm.parse(sm.text(e)) == e
    torch.manual_seed(0)
    env = {"s": torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True),
           "t0": torch.rand(1, 3, 1, 5, dtype=torch.float64, requires_grad=True) + 0.5,
           "t1": torch.rand(2, 1, 4, 5) < 0.3, "b": torch.arange(2).view(-1, 1, 1, 1),
           "h": torch.arange(3).view(-1, 1, 1), "i": torch.arange(4).view(-1, 1), "j": torch.arange(5)}  # fmt: skip
    y = sm.evaluate(e, env)
    for name in ("s", "t0"):
        (want,) = torch.autograd.grad(y.sum(), env[name], retain_graph=True, allow_unused=True)
        got = sm.evaluate(sm.derivative(e, name), env)
        got = torch.as_tensor(got, dtype=torch.float64).expand(y.shape).sum_to_size(env[name].shape)
        torch.testing.assert_close(got, want if want is not None else torch.zeros_like(got))


@pytest.mark.parametrize(
    "text, why",
    [("s + __import__", "unexpected character '_'"), ("s + os", "unknown name"), ("s +", "ends early"),
     ("where(s, 1.0, s)", "boolean input"), ("s + inf", "not \\+inf"),
     ("tanh(s, s)", "takes 1"), ("s; 1", "unexpected character"), ("(" * 40 + "s" + ")" * 40, "deeper"),
     ("s + t9", "unknown name"), ("", "non-empty")],
)  # fmt: skip
def test_bad_expressions_are_refused(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        sm.parse(text)


IR = """itir 1
input %q : f32[1,2,4,8]
input %k : f32[1,2,4,8]
input %v : f32[1,2,4,8]
input %bias : f32[1,2,1,4]
%o = it.transform(q=%q, k=%k, v=%v, extras=[%bias]) {family="dot_exp", heads=2, kv_heads=2, lowering="auto", mask="none", measure="uniform", normalize=true, return_weights=false, scale=0.5, score_mod="MOD", support="full"} : f32[1,2,4,8]
output %o
"""  # noqa: E501


def test_ir_with_a_score_expression_parses_runs_and_is_checked() -> None:
    prog = itc.parse(IR.replace("MOD", "tanh((s + t0) / 4.0) * 4.0"))
    assert str(itc.parse(str(prog))) == str(prog)
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    bias = torch.randn(1, 2, 1, 4)
    s = 0.5 * q @ k.transpose(-1, -2)
    want = torch.softmax(torch.tanh((s + bias) / 4.0) * 4.0, -1) @ v
    (got,) = itc.build(prog)(q, k, v, bias)
    torch.testing.assert_close(got, want)
    for bad, why in (("s + t1", "reads t1"), ("t0", "must read the score"), ("s + nope", "unknown name")):
        with pytest.raises(ItnetError, match=why):
            itc.parse(IR.replace("MOD", bad))


# --------------------------------------------------------------------------------------------- Triton kernels
def _kernel_case(text: str, extras: list[torch.Tensor], causal: bool = False, window: int = 0) -> None:
    torch.manual_seed(0)
    b, h, n, d = 2, 2, 37, 16
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref = attention_dense(q, k, v, None, extras, scale=0.3, causal=causal, return_weights=False, window=window,
                          score_mod=text)  # fmt: skip
    go = torch.randn_like(ref)
    wants = [x for x in extras if x.requires_grad]
    ref_grads = torch.autograd.grad(ref, [q, k, v, *wants], go)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ex32 = [x if x.dtype == torch.bool else x.detach().float().requires_grad_(x.requires_grad) for x in extras]
    out = fused_attention(q32, k32, v32, None, ex32, scale=0.3, causal=causal, window=window, score_mod=text,
                          block_m=16, block_n=16, bwd_block_m=16, bwd_block_n=16)  # fmt: skip
    grads = torch.autograd.grad(out, [q32, k32, v32, *[x for x in ex32 if x.requires_grad]], go.float())
    for got, want in zip([out, *grads], [ref, *ref_grads], strict=True):
        assert (got.double() - want).norm() <= 1e-5 * want.norm()


def test_kernel_softcap_forward_and_backward() -> None:
    _kernel_case("tanh(s / 5.0) * 5.0", [], causal=True)


def test_kernel_bias_gradient_through_broadcast_dims() -> None:
    _kernel_case("s + t0", [torch.randn(1, 2, 1, 37, dtype=torch.float64, requires_grad=True)], causal=True)


def test_kernel_finfo_min_fill_with_fully_masked_rows_is_uniform_as_eager() -> None:
    cond = torch.rand(2, 1, 37, 37) < 0.3
    cond[0, 0, 3] = True  # a row where every entry is filled: eager gives it the uniform average
    bias = torch.randn(2, 2, 37, 37, dtype=torch.float64, requires_grad=True)
    _kernel_case("where(t1, (-3.4028234663852886e+38), s + t0)", [bias, cond])


def test_kernel_index_variables_and_window() -> None:
    bias = torch.randn(2, 2, 37, 37, dtype=torch.float64, requires_grad=True)
    _kernel_case("(s + t0) * 0.25 + i * 0.01 - j * 0.02 + h", [bias], causal=True, window=5)


# ----------------------------------------------------------------------------------------------- real models
class WindowAttention(nn.Module):
    """Swin's (shifted) window attention written in plain torch: relative position bias, then the shift mask added
    through a 5-d view [B, windows, heads, N, N] and viewed back (torchvision's pattern)."""

    def __init__(self, dim: int = 16, heads: int = 2, ws: int = 3):
        super().__init__()
        self.heads, self.n = heads, ws * ws
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads) * 0.5)
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + ws - 1
        self.register_buffer("index", rel[..., 0] * (2 * ws - 1) + rel[..., 1])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // self.heads) ** -0.5, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.table[self.index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        nw = mask.shape[0]
        attn = attn.view(b // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = torch.softmax(attn.view(-1, self.heads, n, n), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def _model(name: str):
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 9))
    if name == "bloom":
        cfg = T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, attn_implementation="eager")
        return T.BloomModel(cfg), (ids,), 2
    if name == "gemma2":
        cfg = T.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=50.0,
                             final_logit_softcapping=None, sliding_window=4, attn_implementation="eager")  # fmt: skip
        return T.Gemma2Model(cfg), (ids,), 2
    if name == "deberta":
        cfg = T.DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                                pos_att_type=["p2c", "c2p"], position_buckets=8)  # fmt: skip
        return T.DebertaV2Model(cfg), (ids,), 2
    if name == "xlnet":
        return T.XLNetModel(T.XLNetConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, d_inner=64)), (ids,), 2
    if name == "longt5":
        cfg = T.LongT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, local_radius=3,
                             encoder_attention_type="local")  # fmt: skip
        ids = torch.randint(0, 64, (2, 12))
        am = torch.ones(2, 12, dtype=torch.long)
        am[1, 9:] = 0
        return T.LongT5EncoderModel(cfg), (ids, am), 2
    mask = torch.zeros(4, 9, 9)
    mask[1:, :4, 4:] = mask[1:, 4:, :4] = -100.0  # the shifted windows' region mask
    return WindowAttention(), (torch.randn(8, 9, 16), mask), 1


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out if isinstance(out, torch.Tensor) else out[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


KINDS = {"bloom": "s + t0", "gemma2": "tanh(s / 50.0) * 50.0", "deberta": "where(t1",
         "xlnet": "(s + t0) * 0.35355339059327373", "longt5": "", "swin": ""}  # fmt: skip


@pytest.mark.parametrize("name", sorted(KINDS))
def test_real_models_capture_every_attention_and_match_eager(name: str) -> None:
    model, args, layers = _model(name)
    model.train(False)
    prog = itc.convert(model, args)
    attn = [t for t in prog.transforms if t.family == "dot_exp"]
    assert len(attn) == layers and all(t.attrs.score_mod.startswith(KINDS[name]) for t in attn)
    assert str(itc.parse(str(prog))) == str(prog)
    with torch.no_grad():
        want = _first(model(*args))
    for plan in (None, {"*": "fused"}):
        got = _first(itc.build(prog, plan=plan)(*args))
        assert _rel(got, want) <= 1e-5, (plan, _rel(got, want))


@pytest.mark.parametrize("name", sorted(KINDS))
def test_score_expressions_run_inside_the_triton_kernels_and_train(name: str) -> None:
    model, args, _ = _model(name)
    model.train(False)
    prog = itc.convert(model, args)
    mod = itc.build(prog, backend="triton")
    assert mod.fallbacks == {}
    assert all(t.lowering == "fused" for t in mod.program.transforms if t.family == "dot_exp")
    out, ref = _first(mod(*args)), _first(model(*args))
    assert _rel(out, ref) <= 1e-5
    r = torch.randn_like(ref)
    (out * r).sum().backward()
    (ref * r).sum().backward()
    ref_params = dict(model.named_parameters())
    scale = max(p.grad.abs().max().item() for p in ref_params.values() if p.grad is not None)
    checked = 0
    for pname, p in mod.gm.named_parameters():
        ref_p = ref_params.get(pname)  # a tied weight has one name in the model (LongT5's embeddings)
        if p.grad is not None and ref_p is not None and ref_p.grad is not None:
            torch.testing.assert_close(p.grad, ref_params[pname].grad, rtol=1e-4, atol=1e-5 * scale)
            checked += 1
    assert checked >= len(ref_params) // 2 and math.isfinite(scale)


@pytest.mark.parametrize("name", ["bloom", "gemma2", "deberta", "swin"])
@pytest.mark.parametrize("opset, keep", [(18, False), (23, True)])
def test_score_expressions_export_to_onnx(name: str, opset: int, keep: bool) -> None:
    import onnxruntime as ort

    model, args, _ = _model(name)
    model.train(False)
    prog = itc.convert(model, args)
    onnx_model = itc.export_onnx(prog, opset=opset, keep_transforms=keep)
    assert keep == any(n.domain == "itnet" for n in onnx_model.graph.node)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(onnx_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {v.name: x.numpy() for v, x in zip(prog.inputs, args, strict=True)}
    got = torch.from_numpy(sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0])
    with torch.no_grad():
        want = _first(itc.build(prog)(*args))
    assert _rel(got, want) <= 1e-5


def test_score_expressions_in_a_triton_bundle(tmp_path) -> None:
    import importlib.util

    model, args, _ = _model("bloom")  # ALiBi: an extra input read by the kernels
    model.train(False)
    prog = itc.convert(model, args)
    itc.export_triton(prog, tmp_path / "b")
    spec = importlib.util.spec_from_file_location("itnet_bundle_bloom", tmp_path / "b" / "itnet_bundle.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    with torch.no_grad():
        assert _rel(_first(launcher.load(str(tmp_path / "b"))(*args)), _first(model(*args))) <= 1e-5


# ------------------------------------------------------------------------------------------- hand-written chains
_B, _H, _L, _D = 2, 3, 7, 8
_BIAS = torch.randn(1, _H, _L, _L, generator=torch.Generator().manual_seed(1))
_ROWBIAS = torch.randn(_B, 1, 1, _L, generator=torch.Generator().manual_seed(2))
_COND = torch.rand(_B, 1, _L, _L, generator=torch.Generator().manual_seed(3)) < 0.3
_EYE = torch.eye(_L, dtype=torch.bool)


def _s(q, k):
    return q @ k.transpose(-1, -2)


def _neg_scale(q, k, v):
    return torch.softmax(_s(q, k) * -0.5, -1) @ v


def _bias_in_tanh(q, k, v):
    return torch.softmax(torch.tanh(_s(q, k) / 3 + _BIAS) * 3, -1) @ v


def _div_tensor(q, k, v):
    return torch.softmax(_s(q, k) / torch.tensor(2.0) + _ROWBIAS, -1) @ v


def _tensor_fill(q, k, v):
    return torch.softmax(torch.where(_COND, _BIAS, _s(q, k)), -1) @ v


def _rsub(q, k, v):
    return torch.softmax(1.0 - _s(q, k), -1) @ v


def _two_masks(q, k, v):
    return torch.softmax(_s(q, k).masked_fill(_COND, float("-inf")).masked_fill(_EYE, float("-inf")), -1) @ v


def _in_place(q, k, v):
    return torch.softmax(_s(q, k).mul_(0.3).add_(_BIAS), -1) @ v


def _five_d(q, k, v):
    return torch.softmax(_s(q, k).view(1, _B, _H, _L, _L) + _BIAS[None], -1).view(_B, _H, _L, _L) @ v


CHAINS = {
    "negative scale": (_neg_scale, "s * (-0.5)"),
    "bias under tanh": (_bias_in_tanh, "tanh(s + t0) * 3.0"),
    "divide by a tensor": (_div_tensor, "s / t0"),
    "tensor fill": (_tensor_fill, "where(t1, t0, s)"),
    "rsub": (_rsub, "1.0 - s"),
    "two -inf masks": (_two_masks, "where(t0, (-inf), s)"),
    "in place": (_in_place, ""),
    "5-d view": (_five_d, ""),
}


class _Chain(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        return self.fn(q, k, v)


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_hand_written_score_chains_are_captured_exactly(name: str) -> None:
    fn, kind = CHAINS[name]
    q, k, v = torch.randn(3, _B, _H, _L, _D, generator=torch.Generator().manual_seed(0)).unbind(0)
    prog = itc.convert(_Chain(fn), (q, k, v))
    [node] = prog.transforms
    assert node.attrs.score_mod == kind
    want = fn(q, k, v)
    for backend, plan in (("torch", None), ("torch", {"*": "fused"}), ("triton", None)):
        mod = itc.build(prog, backend=backend, plan=plan)
        assert not getattr(mod, "fallbacks", {})
        got = mod(q, k, v)
        assert _rel(got, want) <= 1e-5, (backend, plan, _rel(got, want))


# ------------------------------------------------------------------------------------------------ attention sinks
def test_kernel_attention_sinks_forward_and_backward() -> None:
    """Per-head sink logits in every row's normalisation (value 0): the Triton kernels against the dense lowering
    in float64, including a fully masked row (all weight on the sink: output 0) and the sinks' gradient."""
    torch.manual_seed(0)
    b, h, n, d = 2, 3, 29, 16
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sinks = torch.randn(h, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(b, 1, n, n) < 0.8
    mask[1, 0, 4] = False
    ref = attention_dense(q, k, v, mask, None, sinks, scale=0.3, causal=True, return_weights=False)
    go = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [q, k, v, sinks], go)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v, sinks)]
    out = fused_attention(*leaves[:3], mask, None, leaves[3], scale=0.3, causal=True, block_m=16, block_n=16,
                          bwd_block_m=16, bwd_block_n=16)  # fmt: skip
    grads = torch.autograd.grad(out, leaves, go.float())
    assert out[1, :, 4].abs().max() == 0
    for got, want in zip([out, *grads], [ref, *ref_grads], strict=True):
        assert (got.double() - want).norm() <= 1e-5 * want.norm()


def _gpt_oss():
    torch.manual_seed(0)
    cfg = T.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                         num_experts_per_tok=1, sliding_window=4, attn_implementation="eager",
                         use_cache=False)  # fmt: skip
    return T.GptOssModel(cfg).train(False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpt_oss_attention_sinks_are_captured(backend: str) -> None:
    model = _gpt_oss()
    ids = torch.randint(0, 64, (2, 9))
    prog = itc.convert(model, (ids,))
    attn = [t for t in prog.transforms if t.family == "dot_exp"]
    assert len(attn) == 2 and all(t.attrs.has_sinks for t in attn)
    mod = itc.build(prog, backend=backend)
    assert not getattr(mod, "fallbacks", {})
    out, ref = _first(mod(ids)), _first(model(ids))
    assert _rel(out, ref) <= 1e-5
    if backend == "triton":  # one training step: the sinks' gradients (and every other) as eager's
        r = torch.randn_like(ref)
        (out * r).sum().backward()
        (ref * r).sum().backward()
        ref_params = dict(model.named_parameters())
        sink_params = [(name, p) for name, p in mod.gm.named_parameters() if name.endswith("sinks")]
        assert len(sink_params) == 2
        for name, p in sink_params:
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6)


def test_gpt_oss_sinks_export_to_onnx() -> None:
    import onnxruntime as ort

    model = _gpt_oss()
    ids = torch.randint(0, 64, (2, 9))
    prog = itc.convert(model, (ids,))
    sess = ort.InferenceSession(itc.export_onnx(prog).SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0])
    with torch.no_grad():
        assert _rel(got, _first(model(ids))) <= 1e-5


class _MinFilledCausal(nn.Module):
    def forward(self, q, k, v):
        n = q.shape[-2]
        drop = torch.ones(n, n, dtype=torch.bool).triu(1)  # constant: folds at convert time
        s = (q @ k.transpose(-1, -2)).mul(0.25).masked_fill(drop, torch.finfo(q.dtype).min) + _ROWBIAS
        return torch.softmax(s, -1) @ v


def test_finfo_min_fill_with_a_constant_causal_condition_folds_into_the_support() -> None:
    """A finite fill folds only into supports that leave no row empty (causal, window): exact, and the expression
    keeps what remains."""
    q, k, v = torch.randn(3, _B, _H, _L, _D, generator=torch.Generator().manual_seed(0)).unbind(0)
    prog = itc.convert(_MinFilledCausal(), (q, k, v))
    [node] = prog.transforms
    assert (node.attrs.support, node.attrs.mask, node.attrs.score_mod) == ("causal", "additive", "")
    want = _MinFilledCausal()(q, k, v)
    for backend in ("torch", "triton"):
        assert _rel(itc.build(prog, backend=backend)(q, k, v), want) <= 1e-5
