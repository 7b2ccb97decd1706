"""Choosing lowerings for the Triton target: ``build(backend="triton", error_budget=b)`` picks only what the Triton
target runs natively, so every transform runs a generated kernel (no fallback, no layer handed to torch), and a zero
budget picks only exact lowerings. Real models under the interpreter, against the eager model."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402
import transformers  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.ir.lowering import REGISTRY  # noqa: E402
from itnet_compiler.ir.target import TARGETS  # noqa: E402

_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, initializer_range=0.2)


def _bert():
    cfg = transformers.BertConfig(vocab_size=100, max_position_embeddings=64, attn_implementation="sdpa", **_TEXT)
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    return transformers.BertModel(cfg).eval(), (ids,), {"attention_mask": mask}


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                  initializer_range=0.2, use_cache=False, attn_implementation="eager")  # fmt: skip
    return transformers.GPT2Model(cfg).eval(), (torch.randint(0, 100, (2, 10)),), {}


def _lstm():
    class Rnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True)

        def forward(self, x):
            return self.lstm(x)[0]

    return Rnn().eval(), (torch.randn(3, 9, 6),), {}


def _mamba2():
    cfg = transformers.Mamba2Config(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=64, use_cache=False,
                                    num_heads=8, head_dim=8, n_groups=2, chunk_size=8, expand=2,
                                    initializer_range=0.2)  # fmt: skip
    return transformers.Mamba2Model(cfg).eval(), (torch.randint(0, 64, (2, 12)),), {}


MODELS = {"bert": _bert, "gpt2": _gpt2, "lstm": _lstm, "mamba2": _mamba2}


@pytest.mark.parametrize("budget", [0.0, 0.05])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_an_error_budget_on_the_triton_target_runs_only_triton_kernels(name, budget):
    torch.manual_seed(0)
    model, args, kwargs = MODELS[name]()
    prog = itc.convert(model, args, kwargs)
    assert prog.transforms, "nothing to lower"
    mod = itc.build(prog, backend="triton", error_budget=budget)
    triton = TARGETS["triton"]
    for t in mod.program.transforms:
        assert triton.native(t.family, t.attrs.lowering.name), (t.layer, t.lowering)
        if budget == 0:
            assert REGISTRY[(t.family, t.attrs.lowering.name)].exact, (t.layer, t.lowering)
    with torch.no_grad():
        out = pytree.tree_leaves(mod(*args, **kwargs))[0]
        ref = pytree.tree_leaves(model(*args, **kwargs))[0]
    assert mod.fallbacks == {}
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err <= (1e-4 if budget == 0 else budget * 4), err
