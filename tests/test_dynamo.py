"""``torch.compile(model, backend="itnet")`` on real models: inference and one training step match eager torch.

Each test compiles a fresh copy of a small model (BERT, GPT-2, a CNN; built offline from small configs) and compares
it with the eager model: outputs, parameter gradients, and the weights after one optimiser step. The records in
``itnet_compiler.dynamo`` show that the captured graphs ran through itnet (built programs with their transforms,
no fallbacks), and that a graph the converter refuses falls back with its reason, or raises with ``fallback=False``.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import transformers
from torch._dynamo.exc import BackendCompilerFailed

import itnet_compiler as itc
from itnet_compiler import dynamo

RTOL, ATOL = 1e-5, 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    dynamo.reset()
    yield
    torch._dynamo.reset()
    dynamo.reset()


def _bert(impl: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, attn_implementation=impl,
    )  # fmt: skip
    return transformers.BertModel(cfg).eval()


def _gpt2(impl: str, head: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=100,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        use_cache=False,
        attn_implementation=impl,
        bos_token_id=0,
        eos_token_id=0,
    )
    return (transformers.GPT2LMHeadModel if head else transformers.GPT2Model)(cfg).eval()


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = CNN()
    with torch.no_grad():  # non-trivial running statistics, so eval-mode batch norm is not the identity
        for bn in (model.features[1], model.features[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (2, length), generator=torch.Generator().manual_seed(seed))


def _image() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _first(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


MODELS = {
    "bert-sdpa": (lambda: _bert("sdpa"), lambda: _ids(8)),
    "bert-eager": (lambda: _bert("eager"), lambda: _ids(8)),
    "gpt2-sdpa": (lambda: _gpt2("sdpa"), lambda: _ids(8)),
    "gpt2-lm-eager": (lambda: _gpt2("eager", head=True), lambda: _ids(8)),
    "cnn": (_cnn, _image),
}
# The family the inference graph must hold. AOTAutograd decomposes ``matmul`` (expand, clone, _unsafe_view, bmm),
# so a hand-written (eager) attention chain is not recognised there: it runs as generic ops of the built module.
FAMILIES = {
    "bert-sdpa": "dot_exp",
    "bert-eager": None,
    "gpt2-sdpa": "dot_exp",
    "gpt2-lm-eager": None,
    "cnn": "stationary",
}


def _families() -> set[str]:
    return {t.family for g in dynamo.graphs for t in g.program.transforms}


def test_backend_is_registered_by_entry_point():
    assert "itnet" in torch._dynamo.list_backends()
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("itnet") is dynamo.itnet


def test_backend_name_works_without_importing_itnet():
    """``backend="itnet"`` resolves through the entry point in a fresh interpreter that never imported the package."""
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3), torch.nn.ReLU()).eval()\n"
        "x = torch.randn(1, 2, 8)\n"
        "assert 'itnet_compiler' not in sys.modules\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(torch.compile(m, backend='itnet')(x), m(x))\n"
        "from itnet_compiler import dynamo\n"
        "assert dynamo.graphs and not dynamo.fallbacks\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", list(MODELS))
def test_inference_matches_eager(name):
    make, inputs = MODELS[name]
    model = make()
    x = inputs()
    compiled = torch.compile(model, backend="itnet")
    with torch.no_grad():
        ref, out = _first(model(x)), _first(compiled(x))
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    assert dynamo.fallbacks == []
    assert dynamo.graphs
    assert FAMILIES[name] is None or FAMILIES[name] in _families()


@pytest.mark.parametrize("plan", [{"*": "fused"}, {"*": "dense"}])
def test_itnet_lowerings_through_options(plan):
    """The plan reaches itc.build: attention runs in itnet's own lowering, not the vendor SDPA."""
    model, x = _bert("sdpa"), _ids(8)
    compiled = torch.compile(model, backend="itnet", options={"plan": plan})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).last_hidden_state, model(x).last_hidden_state, rtol=RTOL, atol=ATOL)
    lowerings = {t.lowering.split(":")[0] for g in dynamo.graphs for t in g.program.transforms}
    assert lowerings == {plan["*"]}
    assert dynamo.fallbacks == []


@pytest.mark.parametrize("name", ["bert-sdpa", "cnn"])
def test_triton_backend_option(name):
    """``options={"backend": "triton"}``: the transforms run in itnet's Triton kernels (TRITON_INTERPRET on CPU)."""
    make, inputs = MODELS[name]
    model, x = make(), inputs()
    compiled = torch.compile(model, backend="itnet", options={"backend": "triton", "error_budget": 0.0})
    with torch.no_grad():
        torch.testing.assert_close(_first(compiled(x)), _first(model(x)), rtol=1e-4, atol=1e-5)
    assert dynamo.fallbacks == [] and FAMILIES[name] in _families()
    assert {t.lowering.split(":")[0] for g in dynamo.graphs for t in g.program.transforms} == {"fused"}


@pytest.mark.parametrize("name", list(MODELS))
def test_training_step_matches_eager(name):
    make, inputs = MODELS[name]
    ref_model = make()
    model = copy.deepcopy(ref_model)
    compiled = torch.compile(model, backend="itnet")
    x = inputs()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    ref_loss = _first(ref_model(x)).square().mean()
    loss = _first(compiled(x)).square().mean()
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    ref_loss.backward()
    loss.backward()
    ref_params = dict(ref_model.named_parameters())
    for key, p in model.named_parameters():
        r = ref_params[key]
        if r.grad is None:
            assert p.grad is None or not p.grad.any(), key
            continue
        assert p.grad is not None, f"no gradient reached {key}"
        torch.testing.assert_close(p.grad, r.grad, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m, k=key: f"{k}: {m}")
    ref_opt.step()
    opt.step()
    for key, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[key], rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert dynamo.fallbacks == []
    assert any(g.graph.startswith("forward") for g in dynamo.graphs)
    if name == "cnn":  # convolutions are recognised in the training forward graph too
        assert "stationary" in _families()


def test_new_sequence_length_recompiles_and_matches():
    model = _bert("sdpa")
    compiled = torch.compile(model, backend="itnet")
    with torch.no_grad():
        for length in (8, 12, 5):
            x = _ids(length, seed=length)
            torch.testing.assert_close(compiled(x).last_hidden_state, model(x).last_hidden_state, rtol=RTOL, atol=ATOL)
    assert len(dynamo.graphs) >= 2 and dynamo.fallbacks == []


def test_static_recompile_matches():
    model = _gpt2("sdpa")
    compiled = torch.compile(model, backend="itnet", dynamic=False)
    built = []
    with torch.no_grad():
        for length in (8, 12):
            x = _ids(length, seed=length)
            torch.testing.assert_close(compiled(x).last_hidden_state, model(x).last_hidden_state, rtol=RTOL, atol=ATOL)
            built.append(len(dynamo.graphs))
    assert 0 < built[0] < built[1] and dynamo.fallbacks == []


class Branchy(nn.Module):
    """A data-dependent Python branch (``.item()``) and a ``print``: two graph breaks in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)
        if h.sum().item() > 0:
            h = h * 2
        else:
            h = h - 1
        print("itnet test: graph break")
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.lin(h)


@pytest.mark.parametrize("plan", [None, {"conv": "fused", "attn*": "dense"}])
def test_graph_breaks_give_eager_answer(capsys, plan):
    """Each captured graph is built on its own; a plan's entries go to the graphs holding their layers."""
    torch.manual_seed(0)
    model = Branchy().eval()
    compiled = torch.compile(model, backend="itnet", options={"plan": plan})
    for seed in (0, 1, 2):
        x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=RTOL, atol=ATOL)
    assert "itnet test: graph break" in capsys.readouterr().out
    assert len(dynamo.graphs) >= 3 and dynamo.fallbacks == []
    assert {"stationary", "dot_exp"} <= _families()
    if plan is not None:
        chosen = {t.family: t.lowering for g in dynamo.graphs for t in g.program.transforms}
        assert chosen == {"stationary": "fused", "dot_exp": "dense"}


@torch.library.custom_op("itnet_test::scaled_tanh", mutates_args=())
def _scaled_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * 2


@_scaled_tanh.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class WithCustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _scaled_tanh(self.conv(x))


def test_refused_graph_falls_back_with_reason():
    torch.manual_seed(0)
    model = WithCustomOp().eval()
    x = torch.randn(2, 3, 10)
    compiled = torch.compile(model, backend="itnet")
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=RTOL, atol=ATOL)
    assert len(dynamo.fallbacks) == 1 and not dynamo.graphs
    assert "itnet_test.scaled_tanh" in dynamo.fallbacks[0].reason
    assert any("runs as captured" in str(w.message) and "itnet_test" in str(w.message) for w in caught)


def test_refused_graph_raises_without_fallback():
    model = WithCustomOp().eval()
    compiled = torch.compile(model, backend="itnet", options={"fallback": False})
    with torch.no_grad(), pytest.raises(BackendCompilerFailed) as info:
        compiled(torch.randn(2, 3, 10))
    assert isinstance(info.value.inner_exception, itc.ItnetError)
    assert "itnet_test.scaled_tanh" in str(info.value.inner_exception)
    assert dynamo.fallbacks == []


def test_unknown_option_is_refused():
    compiled = torch.compile(_cnn(), backend="itnet", options={"lowering": "fused"})
    with pytest.raises(BackendCompilerFailed) as info:
        compiled(_image())
    assert isinstance(info.value.inner_exception, itc.ItnetError)
    assert "lowering" in str(info.value.inner_exception)
