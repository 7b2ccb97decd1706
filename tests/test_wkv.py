"""RWKV's WKV recurrence as the ``wkv`` family.

transformers' ``RwkvModel`` converts with one ``wkv`` node per layer and a symbolic length, and matches the eager model
(HF's CPU loop is the independent reference) at two lengths under every torch lowering and on the Triton backend
(through the interpreter on the CPU), forward and one backward step. Each lowering is also checked against a float64
loop written here — the unscaled formula summed term by term — and the Triton kernel against the torch scan in
float64, forward and the gradients of k, v, w and u. The IR prints and parses back, exports to ONNX as a Scan, and the
CLI converts the model from a config.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import hypothesis  # noqa: E402,F401  (loaded up front: the Triton interpreter walks module members)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from snapshots import assert_matches_golden  # noqa: E402
from torch import nn  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.backends.torch import wkv as torch_wkv  # noqa: E402
from itnet_compiler.backends.triton import loader, templates  # noqa: E402
from itnet_compiler.backends.triton import wkv as triton_wkv  # noqa: E402
from itnet_compiler.cli import main  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers.models.rwkv.modeling_rwkv import RwkvSelfAttention  # noqa: E402

DEVICE = "cuda" if os.environ.get("ITNET_TEST_GPU") else "cpu"
CONFIG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64,
              context_length=64)  # fmt: skip
LENGTHS = (9, 23)
TOL = 1e-5
TORCH_LOWERINGS = ("scan", "chunked", "chunked:chunk=4")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(seed + n))


def make_model(**extra: object) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.RwkvModel(transformers.RwkvConfig(**CONFIG, use_cache=False, **extra)).train(False)
    with torch.no_grad():  # HF's init leaves the time parameters at a narrow range: spread them so the test sees it
        for blk in model.blocks:
            blk.attention.time_decay.copy_(torch.randn(32) * 1.5)
            blk.attention.time_first.copy_(torch.randn(32))
    model(ids(4))  # the first eval call rescales layers in place (a no-op at 2 layers): keep it out of export
    return model


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return make_model()


@pytest.fixture(scope="module")
def prog(model: nn.Module) -> itc.Program:
    dims = {"input_ids": {1: torch.export.Dim("L", min=2, max=64)}}
    return itc.convert(model, (ids(11),), dynamic_shapes=dims)


# ---------------------------------------------------------------------------------------------- the converted model


def test_each_rwkv_attention_is_one_wkv_node_with_a_symbolic_length(prog: itc.Program) -> None:
    assert [t.family for t in prog.transforms] == ["wkv", "wkv"]
    assert [t.layer for t in prog.transforms] == ["blocks.0.attention", "blocks.1.attention"]
    assert list(prog.symbols) == ["L"]
    for t in prog.transforms:
        assert t.attrs.channels == 32 and t.attrs.support == "causal"
        assert "L" in str(t.outputs[0].type)
    # nothing unrolled: a few dozen generic ops, not one per step
    assert len(list(prog.generic_nodes())) < 100


def _grads(out: torch.Tensor, params: dict[str, torch.Tensor], cot: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [n for n, p in params.items() if p.requires_grad]
    return dict(zip(names, torch.autograd.grad((out * cot).sum(), [params[n] for n in names]), strict=True))


def _check_against_eager(model: nn.Module, mod: nn.Module) -> None:
    params = dict(mod.gm.named_parameters())
    for n in LENGTHS:
        x = ids(n)
        with torch.no_grad():
            ref, out = model(x).last_hidden_state, mod(x).last_hidden_state
        assert out.shape == ref.shape and rel(out, ref) <= TOL, (n, rel(out, ref))
    # one backward step: every parameter's gradient, the wkv's w and u included
    x = ids(LENGTHS[1])
    ref = model(x).last_hidden_state
    cot = torch.randn_like(ref)
    want = _grads(ref, dict(model.named_parameters()), cot)
    got = _grads(mod(x).last_hidden_state, params, cot)
    assert {"blocks.0.attention.time_decay", "blocks.1.attention.time_first"} <= got.keys()
    for name, g in got.items():
        scale = want[name].abs().max().clamp_min(1e-12)
        assert ((g - want[name]).abs().max() / scale).item() <= 1e-4, name


@pytest.mark.parametrize("lowering", TORCH_LOWERINGS)
def test_torch_lowerings_match_eager_at_two_lengths_forward_and_backward(model, prog, lowering: str) -> None:
    mod = itc.build(prog, plan={"*.attention": lowering})
    assert {t.lowering for t in mod.program.transforms} == {lowering}
    _check_against_eager(model, mod)


def test_triton_matches_eager_at_two_lengths_and_trains_without_fallbacks(model, prog) -> None:
    mod = itc.build(prog, backend="triton")
    assert {t.lowering for t in mod.program.transforms} == {"scan"}
    _check_against_eager(model, mod)
    assert mod.fallbacks == {}


@pytest.mark.parametrize(("spec", "chunk"), [("chunked", 32), ("chunked:chunk=4", 4)])
def test_triton_chunked_matches_eager_and_trains_without_fallbacks(model, prog, monkeypatch, spec, chunk) -> None:
    seen: list[int] = []

    def spy(*args, **kw):
        seen.append(kw["chunk"])
        return chunked(*args, **kw)

    chunked = triton_wkv.wkv_chunked
    monkeypatch.setattr(triton_wkv, "wkv_chunked", spy)
    mod = itc.build(prog, backend="triton", plan={"*": spec})
    assert {t.lowering for t in mod.program.transforms} == {spec}
    _check_against_eager(model, mod)
    assert mod.fallbacks == {} and set(seen) == {chunk}


def test_the_attention_module_returns_what_hf_returns_without_a_cache(model) -> None:
    class Wrap(nn.Module):
        def __init__(self, attn: nn.Module):
            super().__init__()
            self.attn = attn

        def forward(self, h: torch.Tensor) -> object:
            out, state = self.attn(h)
            return out, state is None

    wrap = Wrap(model.blocks[0].attention)
    h = torch.randn(2, 7, 32)
    prog = itc.convert(wrap, (h,), dynamic_shapes={"h": {1: torch.export.Dim("L", min=2, max=64)}})
    assert [t.family for t in prog.transforms] == ["wkv"]
    ref_out, ref_state = model.blocks[0].attention(h)
    assert ref_state is None
    out, is_none = itc.build(prog)(h)
    assert is_none is True and rel(out, ref_out) <= TOL


def test_a_cache_is_refused_in_one_line_naming_the_layer(model) -> None:
    """convert turns a config's use_cache off; asked for in the call, the state reaches the layer and is refused."""
    with pytest.raises(itc.ItnetError, match=r"blocks\.0\.attention.*use_cache=False") as err:
        itc.convert(model, (ids(5),), kwargs={"use_cache": True})
    assert "\n" not in str(err.value)


def test_a_model_whose_first_call_rescales_its_layers_converts_with_the_rescaled_weights() -> None:
    """rescale_every=1: eval-mode RWKV divides layer i's output weights by 2^i on its first call and halves the
    hidden state after each layer; converting before any eager call must see the same."""
    torch.manual_seed(0)
    model = transformers.RwkvModel(transformers.RwkvConfig(**CONFIG, use_cache=False, rescale_every=1)).train(False)
    prog = itc.convert(model, (ids(7),))
    assert model.layers_are_rescaled and [t.family for t in prog.transforms] == ["wkv", "wkv"]
    with torch.no_grad():
        assert rel(itc.build(prog)(ids(7)).last_hidden_state, model(ids(7)).last_hidden_state) <= TOL


# ------------------------------------------------------------------------------------------------ by structure


def _copy_class(name: str) -> type[nn.Module]:
    """RwkvSelfAttention's code under another class (not a subclass): found by structure only."""

    def __init__(self, config: object) -> None:
        nn.Module.__init__(self)
        h, c = config.hidden_size, config.attention_hidden_size
        self.layer_id = 0
        self.time_decay, self.time_first = nn.Parameter(torch.zeros(c)), nn.Parameter(torch.zeros(c))
        for mix in ("key", "value", "receptance"):
            setattr(self, f"time_mix_{mix}", nn.Parameter(torch.zeros(1, 1, h)))
        self.time_shift = nn.ZeroPad2d((0, 0, 1, -1))
        self.key, self.value = nn.Linear(h, c, bias=False), nn.Linear(h, c, bias=False)
        self.receptance, self.output = nn.Linear(h, c, bias=False), nn.Linear(c, h, bias=False)

    body = {"__init__": __init__, "forward": RwkvSelfAttention.forward,
            "extract_key_value": RwkvSelfAttention.extract_key_value}  # fmt: skip
    return type(name, (nn.Module,), body)


def test_a_renamed_copy_converts_by_structure_and_a_look_alike_is_traced(model) -> None:
    copy = _copy_class("MyWkvMixer")(model.config)
    copy.load_state_dict(model.blocks[1].attention.state_dict())
    copy.train(False)
    h = torch.randn(2, 6, 32)
    prog = itc.convert(copy, (h,))
    assert [t.family for t in prog.transforms] == ["wkv"]
    assert rel(itc.build(prog)(h)[0], copy(h)[0]) <= TOL
    odd = _copy_class("Biased")(model.config)
    odd.key = nn.Linear(32, 32, bias=True)  # the converter would drop this bias: not taken
    odd.load_state_dict({**model.blocks[1].attention.state_dict(), "key.bias": torch.zeros(32)})
    assert [t.family for t in itc.convert(odd.train(False), (h,)).transforms] == []


# -------------------------------------------------------------------------------------------- lowering differentials


def reference(k, v, w, u) -> torch.Tensor:
    """The WKV by its definition, in float64, each output a sum over its past: no state, no scaling."""
    k, v, w, u = (t.double() for t in (k, v, w, u))
    outs = []
    for t in range(k.shape[1]):
        ages = (t - 1 - torch.arange(t, dtype=torch.float64))[:, None]
        past = torch.exp(-ages * w + k[:, :t])  # [b, i, c]
        now = torch.exp(u + k[:, t])
        outs.append(((past * v[:, :t]).sum(1) + now * v[:, t]) / (past.sum(1) + now))
    return torch.stack(outs, 1)


def _inputs(dtype: torch.dtype, b: int = 2, n: int = 19, c: int = 5, scale: float = 3.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(b, n, c, generator=g, dtype=torch.float64) * scale
    v = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    w = torch.randn(c, generator=g, dtype=torch.float64).exp()
    u = torch.randn(c, generator=g, dtype=torch.float64)
    return [t.to(dtype).to(DEVICE) for t in (k, v, w, u)]


def _value_and_grads(fn, ins: list[torch.Tensor], cot: torch.Tensor) -> list[torch.Tensor]:
    ins = [t.detach().clone().requires_grad_() for t in ins]
    y = fn(*ins)
    grads = torch.autograd.grad((y * cot.to(y.dtype)).sum(), ins, allow_unused=True)  # one step: w is unused
    return [y, *(torch.zeros_like(t) if g is None else g for g, t in zip(grads, ins, strict=True))]


def _triton_scan(k, v, w, u):
    return triton_wkv.wkv_scan(k, v, w, u)


LOWERINGS = {
    "torch-scan": torch_wkv.wkv_scan,
    "torch-chunked": lambda k, v, w, u: torch_wkv.wkv_chunked(k, v, w, u, chunk=4),
    "torch-chunked-budget": lambda k, v, w, u: torch_wkv.wkv_chunked(k, v, w, u, chunk=8, budget=100),
    "triton-scan": _triton_scan,
    "triton-chunked": lambda k, v, w, u: triton_wkv.wkv_chunked(k, v, w, u, chunk=4),
}


@pytest.mark.parametrize("name", list(LOWERINGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_each_lowering_matches_the_float64_loop(name: str, dtype: torch.dtype) -> None:
    ins = _inputs(dtype)
    cot = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    got = _value_and_grads(LOWERINGS[name], ins, cot)
    want = _value_and_grads(reference, [t.double() for t in ins], cot)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    for role, g, r in zip(("y", "k", "v", "w", "u"), got, want, strict=True):
        assert g.dtype == dtype and rel(g, r) <= tol, (role, rel(g, r))


@pytest.mark.parametrize("name", list(LOWERINGS))
def test_large_keys_stay_finite(name: str) -> None:
    """k of a few hundred: e^k overflows float32, the running maxima keep every lowering finite and right."""
    ins = _inputs(torch.float32, scale=150.0)
    y = LOWERINGS[name](*ins)
    assert torch.isfinite(y).all() and rel(y, reference(*ins)) <= 2e-5


def test_triton_scan_matches_the_torch_scan_in_float64() -> None:
    ins = _inputs(torch.float64, b=3, n=33, c=70)  # two channel blocks, the second partial
    cot = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(DEVICE)
    got = _value_and_grads(_triton_scan, ins, cot)
    want = _value_and_grads(torch_wkv.wkv_scan, ins, cot)
    for role, g, r in zip(("y", "k", "v", "w", "u"), got, want, strict=True):
        assert rel(g, r) <= 1e-12, role


def test_triton_scan_in_float16_agrees_with_the_torch_scan() -> None:
    """Half inputs: both accumulate in float32 and round the output once."""
    ins = _inputs(torch.float16, n=12)
    got, want = _triton_scan(*ins), torch_wkv.wkv_scan(*ins)
    assert got.dtype == torch.float16 and rel(got, want) <= 2e-3


@pytest.mark.parametrize("chunk", [4, 16, 32])
@pytest.mark.parametrize("n", [1, 7, 32, 45])
def test_triton_chunked_matches_the_torch_scan_in_float64(n: int, chunk: int) -> None:
    """Lengths that are and are not multiples of the chunk (and shorter than it); 70 channels: several channel
    blocks, the last partial."""
    ins = _inputs(torch.float64, b=2, n=n, c=70)
    cot = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(DEVICE)
    got = _value_and_grads(lambda *a: triton_wkv.wkv_chunked(*a, chunk=chunk), ins, cot)
    want = _value_and_grads(torch_wkv.wkv_scan, ins, cot)
    for role, g, r in zip(("y", "k", "v", "w", "u"), got, want, strict=True):
        assert g.dtype == torch.float64 and rel(g, r) <= 1e-12, (role, rel(g, r))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_chunked_with_large_keys_has_finite_exact_gradients(dtype: torch.dtype) -> None:
    """k of a few hundred (e^k overflows float32): the stabilised state and the scaled state gradients keep the
    forward and every gradient finite and equal to the float64 torch scan's. In float32 the rounding of k ≈ 150 alone
    moves each weight by ~1e-5 relative: w's gradient, a sum of cancelling terms, lands at ~3e-5 for the torch scan and
    chunked lowerings too (1e-4 for the Triton scan), hence its bound."""
    ins = _inputs(dtype, n=45, c=9, scale=150.0)
    cot = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE)
    got = _value_and_grads(lambda *a: triton_wkv.wkv_chunked(*a, chunk=16), ins, cot)
    want = _value_and_grads(torch_wkv.wkv_scan, [t.double() for t in ins], cot)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    tols = {"w": 1e-11 if dtype == torch.float64 else 1e-4}
    for role, g, r in zip(("y", "k", "v", "w", "u"), got, want, strict=True):
        assert torch.isfinite(g).all() and rel(g, r) <= tols.get(role, tol), (role, rel(g, r))


def test_triton_chunked_in_float16_and_past_the_largest_chunk() -> None:
    """Half inputs accumulate in float32 and round once; a chunk above MAX_CHUNK is capped (same result, forward and
    gradients; at 64 steps the backward takes one channel per program)."""
    ins = _inputs(torch.float16, n=12)
    got, want = triton_wkv.wkv_chunked(*ins, chunk=8), torch_wkv.wkv_scan(*ins)
    assert got.dtype == torch.float16 and rel(got, want) <= 2e-3
    ins = _inputs(torch.float64, b=1, n=70, c=3)
    cot = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(DEVICE)
    got = _value_and_grads(lambda *a: triton_wkv.wkv_chunked(*a, chunk=256), ins, cot)
    want = _value_and_grads(torch_wkv.wkv_scan, ins, cot)
    for role, g, r in zip(("y", "k", "v", "w", "u"), got, want, strict=True):
        assert rel(g, r) <= 1e-12, role


def test_triton_chunked_source_matches_its_snapshot() -> None:
    """The source the backend loads is the reviewed snapshot."""
    source = loader.render(templates.WKV_CHUNKED, {"TITLE": "wkv chunked (RWKV)"})
    assert_matches_golden("wkv_chunked", source)
    assert open(triton_wkv.chunked_kernels().__file__).read() == source


# ------------------------------------------------------------------------------------------- formats and the CLI


def test_print_parse_and_bundle_round_trip(model, prog, tmp_path) -> None:
    text = str(prog)
    assert str(itc.parse(text)) == text
    line = next(ln for ln in text.splitlines() if 'family="wkv"' in ln)
    assert "channels=32" in line and 'support="causal"' in line and "k=%" in line and "u=%" in line
    prog.save(tmp_path / "m.itir")
    loaded = itc.load(tmp_path / "m.itir")
    assert str(loaded) == text
    with torch.no_grad():
        assert rel(itc.build(loaded)(ids(23)).last_hidden_state, model(ids(23)).last_hidden_state) <= TOL


def test_onnx_export_is_a_scan_at_two_lengths(prog) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx_model = itc.export_onnx(prog, opset=18)
    ops = {n.op_type for n in onnx_model.graph.node} | {n.op_type for f in onnx_model.functions for n in f.node}
    assert "Scan" in ops
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    built = itc.build(prog)
    for n in LENGTHS:
        (out,) = session.run(None, {session.get_inputs()[0].name: ids(n).numpy()})
        with torch.no_grad():
            ref = built(ids(n)).last_hidden_state.numpy()
        assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4


def test_cli_convert_prints_a_wkv_node(tmp_path, capsys) -> None:
    cfg = tmp_path / "rwkv.json"
    cfg.write_text(json.dumps({"model_type": "rwkv", **CONFIG, "use_cache": False}))
    out = tmp_path / "rwkv.itir"
    assert main(["convert", "hf:RwkvModel", "--config", str(cfg), "-o", str(out), "--dynamic", "input_ids:1=seq"]) == 0
    printed = capsys.readouterr().out
    assert "2 wkv" in printed, printed
    text = (out / "program.itir").read_text()
    assert text.count('family="wkv"') == 2 and "seq" in text
