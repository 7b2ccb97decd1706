"""The gated scans on the Triton backend (through the interpreter on the CPU): LSTMs with projections, Elman RNNs and
the resident/streamed weight paths against nn.LSTM/nn.GRU/nn.RNN in float64, the supported check, and real models
that run and train with no fallback."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import hypothesis  # noqa: E402,F401  (loaded up front: the Triton interpreter walks module members)
import pytest  # noqa: E402
import torch  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.backends.triton import gated as tri_gated  # noqa: E402

DEVICE = "cuda" if os.environ.get("ITNET_TEST_GPU") else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _compare(cell, layers, bidir, batch_first, bias, b, t, i, h, proj, init, dtype, tol, unbatched=False):
    """Outputs and the gradients of every input (x, each weight, h0, c0) against the module in float64."""
    torch.manual_seed(0)
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(cell, torch.nn.RNN)
    extra = {"proj_size": proj} if proj else {}
    if cls is torch.nn.RNN:
        extra["nonlinearity"] = cell.removeprefix("rnn_")
    rnn = cls(i, h, num_layers=layers, bidirectional=bidir, batch_first=batch_first, bias=bias, **extra).double()
    shape = (t, i) if unbatched else ((b, t, i) if batch_first else (t, b, i))
    x = torch.randn(*shape, dtype=torch.float64)
    dirs, sb = layers * (1 + bidir), () if unbatched else (b,)
    states = [torch.randn(dirs, *sb, proj or h, dtype=torch.float64), torch.randn(dirs, *sb, h, dtype=torch.float64)]
    states = states[: 2 if cell == "lstm" else 1] if init else []
    ref_in = [x.clone().requires_grad_(), *rnn._flat_weights, *(s.clone().requires_grad_() for s in states)]
    hx = None if not init else (tuple(ref_in[-2:]) if cell == "lstm" else ref_in[-1])
    y_ref, hn_ref = rnn(ref_in[0], hx)
    refs = [y_ref, *(hn_ref if cell == "lstm" else (hn_ref,))]
    leaves = [v.detach().to(DEVICE, dtype).requires_grad_() for v in ref_in]
    n_w = len(rnn._flat_weights)
    h0, c0 = (leaves[1 + n_w :] + [None, None])[:2] if cell == "lstm" else ((leaves[1 + n_w :] + [None])[0], None)
    outs = tri_gated.gated_scan(leaves[0], leaves[1 : 1 + n_w], h0, c0, cell=cell, hidden_size=h, proj_size=proj,
                                num_layers=layers, bidirectional=bidir, batch_first=batch_first, bias=bias)  # fmt: skip
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs, strict=True):
        assert out.shape == ref.shape and out.dtype == dtype
        assert _rel(out.cpu(), ref) <= tol
    cots = [torch.randn_like(r) for r in refs]
    loss = sum((o * c.to(DEVICE, dtype)).sum() for o, c in zip(outs, cots, strict=True))
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(sum((r * c).sum() for r, c in zip(refs, cots, strict=True)), ref_in)
    for a, r in zip(grads, ref_grads, strict=True):
        assert _rel(a.cpu(), r) <= tol


PROJ_CASES = [
    # layers, bidirectional, batch_first, bias, batch, length, input, hidden, proj, initial states
    (2, True, True, True, 3, 4, 5, 20, 7, True),
    (1, False, False, False, 3, 5, 4, 12, 10, True),
    (1, True, False, True, 17, 3, 3, 9, 4, False),  # two batch blocks of 16, the second one partial
]


PATHS = {  # knobs of the backend module: weights kept in registers or streamed; float32 on FMAs or on tl.dot
    "resident": {"FMA_BLOCK_B": 1},
    # streamed in 8-wide chunks, several per step (H = 12 and P = 10 span two); 2 sequences per program
    "streamed": {"RESIDENT_MAX": 0, "FMA_BLOCK_B": 2},
    "dot": {"FP32_PRECISION": "tf32"},  # the interpreter computes tf32 dots in full float32
    "dot-streamed": {"FP32_PRECISION": "tf32", "RESIDENT_MAX": 0},
}


PROJ_RUNS = [(0, "resident"), (1, "resident"), (1, "streamed"), (2, "dot"), (0, "dot-streamed")]


@pytest.mark.parametrize(
    "case, path",
    [(PROJ_CASES[i], p) for i, p in PROJ_RUNS],
    ids=lambda v: v if isinstance(v, str) else f"L{v[0]}-bi{int(v[1])}-B{v[4]}-H{v[7]}-P{v[8]}",
)
def test_lstm_with_projections_matches_nn_lstm(case, path, monkeypatch):
    for knob, value in PATHS[path].items():
        monkeypatch.setattr(tri_gated, knob, value)
    _compare("lstm", *case, dtype=torch.float32, tol=1e-5)


def test_lstm_with_projections_unbatched_and_float16():
    _compare("lstm", 1, True, False, True, 1, 5, 4, 10, 3, True, dtype=torch.float32, tol=1e-5, unbatched=True)
    _compare("lstm", 2, True, True, True, 3, 4, 5, 20, 7, True, dtype=torch.float16, tol=5e-3)


@pytest.mark.parametrize("path", ["streamed", "dot-streamed"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_streamed_weights_match_without_projections(cell, path, monkeypatch):
    for knob, value in PATHS[path].items():
        monkeypatch.setattr(tri_gated, knob, value)
    _compare(cell, 1, True, True, True, 2, 4, 5, 20, 0, True, dtype=torch.float32, tol=1e-5)
    if path == "streamed":
        _compare(cell, 1, False, False, True, 2, 4, 4, 20, 0, True, dtype=torch.float16, tol=5e-3)


def test_the_scan_config_keeps_small_weights_resident_and_streams_large_ones():
    small = tri_gated._config(3, 20, 7, 4, True, torch.float32)
    assert small.resident and not small.dot and small.block_b == 1 and (small.block_k, small.block_j) == (16, 32)
    assert tri_gated._config(3, 20, 7, 4, True, torch.float32, cuda=False).block_b == 16
    large = tri_gated._config(64, 256, 256, 4, False, torch.float32)
    assert not large.resident and large.block_b == 4 and (large.block_k, large.block_j) == (8, 8)
    half = tri_gated._config(64, 256, 256, 4, False, torch.float16)
    assert half.dot and half.block_b == 16 and not half.resident and half.block_k == 16


def test_unsupported_calls_get_a_reason():
    static = dict(cell="lstm", hidden_size=4, proj_size=2, num_layers=1, bidirectional=False, batch_first=False,
                  bias=True)  # fmt: skip
    rnn = torch.nn.LSTM(3, 4, proj_size=2)
    x = torch.randn(5, 2, 3)
    assert tri_gated.supported(x, list(rnn._flat_weights), **static) is None
    assert "float64" in tri_gated.supported(x.double(), [w.double() for w in rnn._flat_weights], **static)
    assert "weights of dtype torch.float16" in tri_gated.supported(x, [w.half() for w in rnn._flat_weights], **static)
    assert "empty sequence" in tri_gated.supported(x[:0], list(rnn._flat_weights), **static)
    long = torch.empty(1, 1, 3).expand(2**10, 2**10, 3)  # buffers of 2³⁴ elements at H = 4096; no storage
    assert "32-bit offsets" in tri_gated.supported(long, list(rnn._flat_weights), **dict(static, hidden_size=4096))


class _Tagger(torch.nn.Module):
    """Embedding, a 2-layer bidirectional LSTM with projections, a GRU on top, a linear head."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 6)
        self.lstm = torch.nn.LSTM(6, 12, num_layers=2, bidirectional=True, batch_first=True, proj_size=5)
        self.gru = torch.nn.GRU(10, 7, batch_first=True)
        self.head = torch.nn.Linear(7, 4)

    def forward(self, ids):
        y, (h, c) = self.lstm(self.emb(ids))
        z, _ = self.gru(y)
        return self.head(z) + h.sum(0).mean(-1, keepdim=True)[:, None] + c.sum(0).mean(-1, keepdim=True)[:, None]


def test_lstm_projection_model_runs_and_trains_on_triton():
    torch.manual_seed(0)
    model = _Tagger().eval()
    ids = torch.randint(0, 30, (2, 6))
    mod = itc.build(itc.convert(model, (ids,)), backend="triton")
    out, ref = mod(ids), model(ids)
    assert mod.fallbacks == {}
    assert {(t.family, t.lowering) for t in mod.program.transforms} == {("gated", "scan")}
    assert _rel(out, ref) <= 1e-5
    with torch.no_grad():  # the inference launch keeps no per-step state
        assert _rel(mod(ids), ref) <= 1e-5
    r = torch.randn_like(ref)
    (out * r).sum().backward()
    (ref * r).sum().backward()
    ref_params = dict(model.named_parameters())
    scale = max(p.grad.abs().max().item() for p in ref_params.values() if p.grad is not None)
    checked = set()
    for name, p in mod.gm.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5 * scale)
            checked.add(name)
    assert {"lstm.weight_hr_l0", "lstm.weight_hr_l1_reverse", "lstm.weight_hh_l1"} <= checked


def test_a_float64_lstm_falls_back_with_one_warning_and_the_right_answer():
    torch.manual_seed(0)
    model = torch.nn.LSTM(4, 6, proj_size=3).double().eval()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    mod = itc.build(itc.convert(model, (x,)), backend="triton")
    with pytest.warns(UserWarning, match="runs on the torch backend") as rec:
        out = mod(x)
        mod(x)
    assert len([w for w in rec if "torch backend" in str(w.message)]) == 1
    assert list(mod.fallbacks.values()) == ["dtype torch.float64 (the gated scans take float32, float16 and bfloat16)"]
    assert _rel(out[0], model(x)[0]) <= 1e-12


RNN_CASES = [
    # layers, bidirectional, batch_first, bias, batch, length, input, hidden, initial state
    (2, True, True, True, 3, 4, 5, 20, True),
    (1, False, False, False, 17, 5, 4, 12, False),  # two batch blocks of 16, the second one partial
]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", RNN_CASES, ids=lambda v: f"L{v[0]}-bi{int(v[1])}-B{v[4]}-H{v[7]}")
@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu"])
def test_rnn_scan_matches_nn_rnn(cell, case, path, monkeypatch):
    for knob, value in PATHS[path].items():
        monkeypatch.setattr(tri_gated, knob, value)
    layers, bidir, batch_first, bias, b, t, i, h, init = case
    _compare(cell, layers, bidir, batch_first, bias, b, t, i, h, 0, init, dtype=torch.float32, tol=1e-5)


def test_rnn_scan_unbatched_and_float16():
    _compare("rnn_tanh", 1, True, False, True, 1, 5, 4, 10, 0, True, dtype=torch.float32, tol=1e-5, unbatched=True)
    _compare("rnn_relu", 2, False, True, True, 3, 4, 5, 20, 0, True, dtype=torch.float16, tol=5e-3)


class _RnnNet(torch.nn.Module):
    """Two Elman RNNs (relu, 2 layers, bidirectional, batch first; then tanh without bias) and a linear head."""

    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.RNN(5, 8, num_layers=2, nonlinearity="relu", bidirectional=True, batch_first=True)
        self.top = torch.nn.RNN(16, 6, bias=False, batch_first=True)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x, h0):
        y, h = self.rnn(x, h0)
        z, _ = self.top(y)
        return self.head(z) + h.sum(0).mean(-1, keepdim=True)[:, None]


def test_rnn_model_runs_and_trains_on_triton_at_two_lengths():
    torch.manual_seed(0)
    model = _RnnNet().eval()
    length = torch.export.Dim("L", min=2, max=64)
    args = (torch.randn(2, 7, 5), torch.randn(4, 2, 8))
    prog = itc.convert(model, args, dynamic_shapes={"x": {1: length}, "h0": None})
    assert [(t.family, t.attrs.cell) for t in prog.transforms] == [("gated", "rnn_relu"), ("gated", "rnn_tanh")]
    mod = itc.build(prog, backend="triton")
    ref_params = dict(model.named_parameters())
    for n in (5, 11):
        model.zero_grad()
        x, h0 = torch.randn(2, n, 5, requires_grad=True), torch.randn(4, 2, 8, requires_grad=True)
        out, ref = mod(x, h0), model(x, h0)
        assert mod.fallbacks == {}
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        r = torch.randn_like(ref)
        params = dict(mod.gm.named_parameters())
        got = torch.autograd.grad((out * r).sum(), [x, h0, *(params[k] for k in ref_params)])
        want = torch.autograd.grad((ref * r).sum(), [x, h0, *ref_params.values()])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
