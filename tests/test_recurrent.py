"""Recurrences and state-space models as integral transforms.

nn.LSTM / nn.GRU / nn.RNN become one ``gated`` node each; HF MambaModel and Mamba2Model one ``stationary`` (causal
depthwise conv) and one ``ssm`` node per mixer; the paper's S4D one ``stationary`` node with a generated kernel (and,
as a second capture, its recurrence as a time-invariant ``ssm``). Each case is converted once with a dynamic length and
run at two lengths under every torch lowering of its family, against the eager model: torch's own RNN kernels, HF's CPU
path and the paper's FFT code are the independent references. The ssm lowerings are also checked against a float64
loop here.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from rich.console import Console
from s4d import S4D, S4DModel, captured_as
from torch import nn

import itnet_compiler as itc
from itnet_compiler.backends.torch import lowerings as L
from itnet_compiler.ir import TensorType
from itnet_compiler.report import print_inspect

# torch's own note that oneDNN has no projected LSTM (it then runs its default kernel, which is what we compare with)
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

LENGTHS = (16, 37)
TOL = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (complex values compared as complex)."""
    wide = torch.complex128 if out.is_complex() or ref.is_complex() else torch.float64
    out, ref = out.to(wide), ref.to(wide)
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def leaves(out: object) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


# ----------------------------------------------------------------------------------------------------------- cases


class RNNNet(nn.Module):
    """An RNN module called bare, with or without initial states: the model returns exactly what the RNN returns."""

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, hx: object = None) -> object:
        return self.rnn(x, hx)


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: Callable[[int], tuple[object, ...]]  # length -> positional inputs
    dynamic: dict[str, object]
    lowerings: tuple[str, ...]
    families: dict[str, int]  # family -> number of it.transform nodes expected
    capture: str | None = None  # the S4D converter form
    layer_glob: str = "*"
    state: dict[str, int] = field(default_factory=dict)


def _seq() -> torch.export.Dim:
    return torch.export.Dim("L", min=2, max=8192)


def rnn_case(name: str, cls: type[nn.RNNBase], init: bool, unbatched: bool = False, **kw: object) -> Case:
    torch.manual_seed(0)
    rnn = cls(8, 16, **kw)
    model = RNNNet(rnn).eval()
    dirs = 2 if rnn.bidirectional else 1
    hout = getattr(rnn, "proj_size", 0) or 16
    g = torch.Generator().manual_seed(1)

    def inputs(n: int) -> tuple[object, ...]:
        batch = () if unbatched else (3,)
        x = torch.randn(*((3, n) if rnn.batch_first and not unbatched else (n, *batch)), 8, generator=g)
        if not init:
            return (x,)
        h0 = torch.randn(rnn.num_layers * dirs, *batch, hout, generator=g)
        if cls is not nn.LSTM:
            return x, h0
        return x, (h0, torch.randn(rnn.num_layers * dirs, *batch, 16, generator=g))

    axis = 1 if rnn.batch_first and not unbatched else 0
    states = (None, None) if cls is nn.LSTM else None
    dynamic = {"x": {axis: _seq()}, **({"hx": states} if init else {})}
    return Case(name, model, inputs, dynamic, GATED, {"gated": 1})


def mamba_case(version: int) -> Case:
    import transformers

    torch.manual_seed(0)
    kw = {"hidden_size": 32, "state_size": 8, "num_hidden_layers": 2, "vocab_size": 64, "use_cache": False}
    if version == 1:
        model = transformers.MambaModel(transformers.MambaConfig(**kw, time_step_rank=4))
    else:
        cfg = transformers.Mamba2Config(**kw, num_heads=8, head_dim=8, n_groups=2, chunk_size=8, expand=2)
        model = transformers.Mamba2Model(cfg)
    g = torch.Generator().manual_seed(1)

    def inputs(n: int) -> tuple[object, ...]:
        return (torch.randint(0, 64, (2, n), generator=g),)

    return Case(
        f"mamba{'' if version == 1 else '2'}",
        model.eval(),
        inputs,
        {"input_ids": {1: _seq()}},
        SSM,
        {"stationary": 2, "ssm": 2},
        layer_glob="layers.*.mixer",
        state={"heads": 64 if version == 1 else 8, "state_size": 8},
    )


def s4d_case(form: str) -> Case:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)

    def inputs(n: int) -> tuple[object, ...]:
        return (torch.randn(2, n, 4, generator=g),)

    lowerings = STATIONARY if form == "stationary" else SSM
    name = "s4d" if form == "stationary" else "s4d-as-ssm"
    model = S4DModel().eval()
    # from the model's own modules: one transform per S4D layer, one per 1×1 output conv
    layers = sum(isinstance(m, S4D) for m in model.modules())
    convs = sum(isinstance(m, nn.Conv1d) for m in model.modules())
    families = {"stationary": layers + convs} if form == "stationary" else {"ssm": layers, "stationary": convs}
    return Case(name, model, inputs, {"x": {1: _seq()}}, lowerings, families, form, "blocks.*.s4d")


GATED, SSM, STATIONARY = ("library", "scan"), ("scan", "chunked", "dense"), ("library", "dense", "fft")
CASES: dict[str, Callable[[], Case]] = {
    "lstm": lambda: rnn_case("lstm", nn.LSTM, init=False),
    "lstm-bi-2layer-init": lambda: rnn_case(
        "lstm-bi-2layer-init", nn.LSTM, init=True, num_layers=2, bidirectional=True, batch_first=True, dropout=0.3
    ),
    "lstm-proj-bi-2layer": lambda: rnn_case(
        "lstm-proj-bi-2layer", nn.LSTM, init=True, num_layers=2, bidirectional=True, proj_size=6
    ),
    "lstm-nobias-unbatched": lambda: rnn_case("lstm-nobias-unbatched", nn.LSTM, init=True, unbatched=True, bias=False),
    "gru": lambda: rnn_case("gru", nn.GRU, init=False, batch_first=True),
    "gru-bi-2layer-init": lambda: rnn_case("gru-bi-2layer-init", nn.GRU, init=True, num_layers=2, bidirectional=True),
    "rnn-tanh": lambda: rnn_case("rnn-tanh", nn.RNN, init=False),
    "rnn-relu-bi-2layer-init": lambda: rnn_case(
        "rnn-relu-bi-2layer-init", nn.RNN, init=True, nonlinearity="relu", num_layers=2, bidirectional=True
    ),
    "rnn-nobias-unbatched": lambda: rnn_case("rnn-nobias-unbatched", nn.RNN, init=True, unbatched=True, bias=False),
    "mamba": lambda: mamba_case(1),
    "mamba2": lambda: mamba_case(2),
    "s4d": lambda: s4d_case("stationary"),
    "s4d-as-ssm": lambda: s4d_case("ssm"),
}


@dataclass
class Converted:
    case: Case
    prog: itc.Program


@pytest.fixture(scope="module")
def converted(request: pytest.FixtureRequest) -> Converted:
    case = CASES[request.param]()
    args = case.inputs(11)
    if case.capture is None:
        return Converted(case, itc.convert(case.model, args, dynamic_shapes=case.dynamic))
    with captured_as(case.capture):
        return Converted(case, itc.convert(case.model, args, dynamic_shapes=case.dynamic))


def _pairs() -> list[tuple[str, str]]:
    """(case, lowering) for every lowering of the case's family, without building the models at collection time."""
    family = {"s4d": STATIONARY, "s4d-as-ssm": SSM, "mamba": SSM, "mamba2": SSM}
    return [(name, low) for name in CASES for low in family.get(name, GATED)]


def _eager(case: Case, args: tuple[object, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        return leaves(case.model(*args))


# ---------------------------------------------------------------------------------------------- model equivalence


@pytest.mark.parametrize("converted", list(CASES), indirect=True)
def test_each_recurrent_layer_is_one_transform_with_a_symbolic_length(converted: Converted) -> None:
    case, prog = converted.case, converted.prog
    counts: dict[str, int] = {}
    for t in prog.transforms:
        counts[t.family] = counts.get(t.family, 0) + 1
    assert counts == case.families
    assert not any("lstm" in n.op or "gru" in n.op for n in prog.generic_nodes())
    assert list(prog.symbols) == ["L"]
    for t in prog.transforms:
        out = t.outputs[0].type
        assert isinstance(out, TensorType) and any("L" in str(d) for d in out.shape), t.layer
    for t in (t for t in prog.transforms if t.family == "ssm" and case.state):
        assert (t.attrs.heads, t.attrs.state_size) == (case.state["heads"], case.state["state_size"])


@pytest.mark.parametrize(("converted", "lowering"), _pairs(), indirect=["converted"])
def test_every_lowering_matches_eager_at_two_lengths(converted: Converted, lowering: str) -> None:
    case, prog = converted.case, converted.prog
    mod = itc.build(prog, plan={case.layer_glob: lowering})
    chosen = {t.lowering for t in mod.program.transforms if fnmatch.fnmatchcase(t.layer, case.layer_glob)}
    assert chosen == {lowering} or (case.families.keys() > {"ssm"} and chosen == {lowering, "library"})
    for n in LENGTHS:
        args = case.inputs(n)
        ref = _eager(case, args)
        with torch.no_grad():
            out = leaves(mod(*args))
        assert len(out) == len(ref)
        for i, (o, r) in enumerate(zip(out, ref, strict=True)):
            assert o.shape == r.shape, (i, n)
            assert rel_err(o, r) <= TOL, f"{case.name} {lowering} L={n} output {i}: {rel_err(o, r):.2e}"


@pytest.mark.parametrize("converted", list(CASES), indirect=True)
def test_print_parse_and_bundle_round_trips(converted: Converted, tmp_path) -> None:
    case, prog = converted.case, converted.prog
    text = str(prog)
    assert str(itc.parse(text)) == text
    prog.save(tmp_path / "m.itir")
    loaded = itc.load(tmp_path / "m.itir")
    assert str(loaded) == text
    args = case.inputs(LENGTHS[1])
    with torch.no_grad():
        direct, reloaded = leaves(itc.build(prog)(*args)), leaves(itc.build(loaded)(*args))
    for d, r, e in zip(direct, reloaded, _eager(case, args), strict=True):
        torch.testing.assert_close(r, d, rtol=0, atol=0)
        assert rel_err(r, e) <= TOL


def test_mamba_attention_mask_zeroes_padded_positions() -> None:
    case = mamba_case(1)
    ids = case.inputs(13)[0]
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    prog = itc.convert(case.model, (ids,), {"attention_mask": mask})
    assert any(n.op == "aten.mul.Tensor" and n.layer.endswith("mixer") for n in prog.generic_nodes())
    with torch.no_grad():
        ref = case.model(ids, attention_mask=mask).last_hidden_state
        out = itc.build(prog)(ids, attention_mask=mask).last_hidden_state
    assert rel_err(out, ref) <= TOL


# ------------------------------------------------------------------------------------------------------ user errors


def test_packed_sequence_fails_with_one_line_naming_the_layer() -> None:
    model = RNNNet(nn.LSTM(8, 16)).eval()
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 8), torch.tensor([5, 3]))
    with pytest.raises(itc.ItnetError, match=r"layer 'rnn'.*PackedSequence.*padded") as err:
        itc.convert(model, (packed,))
    assert "\n" not in str(err.value)


def test_rnn_dropout_in_training_mode_asks_for_eval_mode() -> None:
    model = RNNNet(nn.GRU(8, 16, num_layers=2, dropout=0.5)).train()
    with pytest.raises(itc.ItnetError, match=r"layer 'rnn'.*training mode.*eval"):
        itc.convert(model, (torch.randn(5, 2, 8),))


# --------------------------------------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("converted", ["mamba2", "lstm-proj-bi-2layer"], indirect=True)
def test_inspect_shows_family_state_size_and_cost_in_length(converted: Converted) -> None:
    console = Console(record=True, width=400)
    print_inspect(converted.prog, console)
    text = console.export_text()
    if converted.case.name == "mamba2":
        assert "ssm" in text and "state 8×8×8" in text and "groups 2" in text
    else:
        assert "gated" in text and "lstm 2 layers × 2 dir" in text and "proj 6" in text and "state 6+16" in text
    row = next(line for line in text.splitlines() if ("ssm" in line or "gated" in line))
    assert "*L" in row or "L*" in row, row


# -------------------------------------------------------------------------------- ssm lowerings against float64


def reference_ssm(x, dt, A, B, C, D=None, dt_bias=None, h0=None, *, softplus, dt_min=-math.inf, dt_max=math.inf):
    """The recurrence h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t, y_t = Re C_tᵀ h_t + D x_t in float64, step by step."""
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    cdt = torch.complex128 if A.is_complex() else torch.float64
    dt = dt.double() + (0 if dt_bias is None else dt_bias.double())
    dt = (F.softplus(dt) if softplus else dt).clamp(min=dt_min, max=dt_max)
    dt = dt.expand(b, length, h)
    a = A.to(cdt) if A.dim() == 2 else A.to(cdt)[:, None].expand(h, n)
    B, C = (t.to(cdt).expand(b, length, g, n).repeat_interleave(h // g, dim=2) for t in (B, C))
    state = torch.zeros(b, h, p, n, dtype=cdt) if h0 is None else h0.to(cdt).clone()
    y = torch.zeros(b, length, h, p, dtype=cdt)
    for t in range(length):
        step = dt[:, t, :, None, None]
        state = torch.exp(step * a[None, :, None, :]) * state + step * x[:, t, :, :, None].double() * B[:, t, :, None]
        y[:, t] = (state * C[:, t, :, None]).sum(-1)
    y = y.real if y.is_complex() else y
    return (y if D is None else y + x.double() * D.double()[:, None]), state


def _ssm_inputs(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, length = 2, 29
    if kind == "mamba":  # diagonal A per channel, P = 1, one group
        h, p, gr, n = 6, 1, 1, 4
        A, sel = -torch.rand(h, n, generator=g) * 3, True
    elif kind == "mamba2":  # scalar A per head, P > 1, two groups
        h, p, gr, n = 6, 3, 2, 4
        A, sel = -torch.rand(h, generator=g) * 3, True
    else:  # time-invariant, complex diagonal A (S4D in recurrent form)
        h, p, gr, n = 4, 1, 4, 3
        A, sel = torch.complex(-torch.rand(h, n, generator=g), torch.randn(h, n, generator=g) * 3), False
    x = torch.randn(b, length, h, p, generator=g)
    if sel:
        dt, B, C = (torch.randn(*s, generator=g) for s in ((b, length, h), (b, length, gr, n), (b, length, gr, n)))
    else:
        dt = torch.rand(h, generator=g) * 0.2
        B, C = (torch.view_as_complex(torch.randn(gr, n, 2, generator=g)) for _ in range(2))
    h0 = torch.randn(b, h, p, n, generator=g).to(A.dtype if A.is_complex() else torch.float32)
    return x, dt, A, B, C, torch.randn(h, generator=g), torch.randn(h, generator=g) * 0.3, h0, sel


SSM_IMPLS = {
    "scan": lambda *a, **k: L.ssm_scan(*a, **k, block=7),
    "chunked": lambda *a, **k: L.ssm_chunked(*a, **k, chunk=8),
    "chunked-grouped": lambda *a, **k: L.ssm_chunked(*a, **k, chunk=5, budget=600),
    "dense": L.ssm_dense,
}


@pytest.mark.parametrize("impl", list(SSM_IMPLS))
@pytest.mark.parametrize("kind", ["mamba", "mamba2", "lti-complex"])
@pytest.mark.parametrize("with_state", [False, True])
def test_ssm_lowerings_match_float64_recurrence(impl: str, kind: str, with_state: bool) -> None:
    x, dt, A, B, C, D, bias, h0, selective = _ssm_inputs(kind)
    bias = bias if selective else None
    h0 = h0 if with_state else None
    limits = {"dt_min": 0.05, "dt_max": 2.0} if kind == "mamba2" else {}
    ref_y, ref_h = reference_ssm(x, dt, A, B, C, D, bias, h0, softplus=selective, **limits)
    y, h = SSM_IMPLS[impl](
        x, dt, A, B, C, D, bias, h0, dt_softplus=selective, return_state=True,
        dt_min=limits.get("dt_min", -math.inf), dt_max=limits.get("dt_max", math.inf),
    )  # fmt: skip
    assert y.dtype == x.dtype and y.shape == x.shape
    assert rel_err(y, ref_y) <= 2e-6
    assert rel_err(h, ref_h) <= 2e-6


# ----------------------------------------------------------------------------------------------- stationary fft


CONVS = [  # depthwise causal (Mamba), grouped, dense with reflect padding, a kernel as long as the input (S4D)
    (6, 6, 6, 4, (3, 0), "zeros"),
    (4, 8, 2, 5, (2, 2), "zeros"),
    (3, 5, 1, 7, (3, 3), "reflect"),
    (4, 4, 4, 40, (39, 0), "zeros"),
]


@pytest.mark.parametrize(("cin", "cout", "groups", "k", "padding", "mode"), CONVS)
def test_fft_convolution_matches_library(cin: int, cout: int, groups: int, k: int, padding, mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, 40, generator=g)
    w = torch.randn(cout, cin // groups, k, generator=g)
    bias = torch.randn(cout, generator=g)
    ref = L.conv_library(
        x, w, bias, stride=(1,), padding=(padding,), dilation=(1,), groups=groups, transposed=False,
        output_padding=(0,), padding_mode=mode,
    )  # fmt: skip
    out = L.conv_fft_1d(x, w, bias, padding=(padding,), groups=groups, padding_mode=mode)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-6


class DilatedThen2d(nn.Module):
    """A dilated grouped 1-d conv and a strided 2-d conv: geometries the 1-d fast path leaves to the general form."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(4, 6, 3, dilation=2, padding=2, groups=2)
        self.b = nn.Conv2d(1, 3, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).unsqueeze(1))


def test_fft_lowering_sends_other_geometries_to_the_general_form() -> None:
    net = DilatedThen2d().eval()
    x = torch.randn(2, 4, 30)
    prog = itc.convert(net, (x,))
    assert [t.family for t in prog.transforms] == ["stationary", "stationary"]
    with torch.no_grad():
        assert rel_err(itc.build(prog, plan={"*": "fft"})(x), net(x)) <= 1e-5


def test_torch_scan_lowering_trains_like_the_dense_one():
    """The scan lowering writes steps in place for speed; with gradients on it must still be differentiable."""
    import math

    from itnet_compiler.backends.torch.recurrent import ssm_dense, ssm_scan

    g = torch.Generator().manual_seed(0)
    f64 = dict(generator=g, dtype=torch.float64)
    ins = [torch.randn(2, 9, 3, 2, **f64), torch.rand(2, 9, 3, **f64),
           -torch.rand(3, 4, **f64), torch.randn(2, 9, 1, 4, **f64),
           torch.randn(2, 9, 1, 4, **f64)]  # fmt: skip
    kw = dict(dt_softplus=False, dt_min=-math.inf, dt_max=math.inf, return_state=False)
    a = [t.clone().requires_grad_() for t in ins]
    b = [t.clone().requires_grad_() for t in ins]
    ya, yb = ssm_scan(*a, **kw, block=4), ssm_dense(*b, **kw)
    torch.testing.assert_close(ya, yb)
    for ga, gb in zip(torch.autograd.grad(ya.sum(), a), torch.autograd.grad(yb.sum(), b), strict=True):
        torch.testing.assert_close(ga, gb)


# ---------------------------------------------------------------------------------------------------------- nn.RNN

RNN_GRID = [
    # nonlinearity, layers, bidirectional, batch_first, bias, initial state, unbatched
    ("tanh", 1, False, False, True, False, False),
    ("relu", 2, True, True, True, True, False),
    ("tanh", 2, False, True, False, True, False),
    ("relu", 1, True, False, False, False, True),
]


@pytest.mark.parametrize("lowering", GATED)
@pytest.mark.parametrize("config", RNN_GRID, ids=lambda c: "-".join(str(v) for v in c))
def test_nn_rnn_forward_and_backward_match_eager_at_two_lengths(config, lowering: str) -> None:
    act, layers, bidir, batch_first, bias, init, unbatched = config
    torch.manual_seed(0)
    rnn = nn.RNN(5, 7, num_layers=layers, nonlinearity=act, bias=bias, batch_first=batch_first, bidirectional=bidir)
    model = RNNNet(rnn).eval()
    axis = 1 if batch_first and not unbatched else 0
    batch = () if unbatched else (3,)

    def inputs(n: int) -> tuple[torch.Tensor, ...]:
        x = torch.randn(*((3, n) if axis else (n, *batch)), 5)
        return (x, torch.randn(layers * (1 + bidir), *batch, 7)) if init else (x,)

    dynamic = {"x": {axis: _seq()}, **({"hx": None} if init else {})}
    prog = itc.convert(model, inputs(6), dynamic_shapes=dynamic)
    (t,) = prog.transforms
    assert (t.family, t.attrs.cell) == ("gated", f"rnn_{act}") and list(prog.symbols) == ["L"]
    mod = itc.build(prog, plan={"*": lowering})
    params = dict(mod.gm.named_parameters())
    for n in LENGTHS:
        args = [a.requires_grad_() for a in inputs(n)]
        out, ref = leaves(mod(*args)), leaves(model(*args))
        for o, r in zip(out, ref, strict=True):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
        cots = [torch.randn_like(r) for r in ref]
        names = [k for k, _ in model.named_parameters()]
        loss = sum((o * c).sum() for o, c in zip(out, cots, strict=True))
        got = torch.autograd.grad(loss, [*args, *map(params.get, names)])
        loss = sum((r * c).sum() for r, c in zip(ref, cots, strict=True))
        want = torch.autograd.grad(loss, [*args, *model.parameters()])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_cli_converts_an_nn_rnn_to_a_gated_node(tmp_path, capsys) -> None:
    from itnet_compiler.cli import main

    (tmp_path / "rnn_model.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.rnn = torch.nn.RNN(4, 6, num_layers=2, nonlinearity='relu', batch_first=True)\n"
        "    def forward(self, x):\n"
        "        return self.rnn(x)[0]\n"
        "def make():\n"
        "    return M().eval(), (torch.randn(2, 9, 4),)\n"
    )
    bundle = tmp_path / "rnn.itir"
    assert main(["convert", f"{tmp_path / 'rnn_model.py'}:make", "-o", str(bundle), "--dynamic", "x:1=L:2:64"]) == 0
    assert "transforms: 1 (1 gated)" in capsys.readouterr().out
    assert main(["inspect", str(bundle)]) == 0
    assert "rnn_relu 2 layers × 1 dir" in capsys.readouterr().out
    (node,) = itc.load(bundle).transforms
    assert 'cell="rnn_relu"' in str(itc.load(bundle)) and node.layer == "rnn"
