"""Findings of a new user's first session (issue 14): transformers decoders with their default config convert
through the Python API, export failures keep torch's reason and suggested fixes, a wrong dtype says so."""

from __future__ import annotations

import pytest
import torch
import transformers

import itnet_compiler as itc


def test_default_config_decoder_converts_through_the_api() -> None:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    assert cfg.use_cache  # the default: the model returns a DynamicCache
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    prog = itc.convert(model, (ids,))
    assert model.config.use_cache, "the model's config is restored after conversion"
    assert len([n for n in prog.transforms if n.family == "dot_exp"]) == 2
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    got = itc.build(prog)(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


class Fixed(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(2, 8, 4).sum(-1)


def test_export_error_keeps_torch_reason_and_suggested_fix() -> None:
    seq = torch.export.Dim("seq", max=64)
    with pytest.raises(itc.ItnetError) as err:
        itc.convert(Fixed(), (torch.randn(2, 32),), dynamic_shapes={"x": {1: seq}})
    text = str(err.value)
    assert "\n" not in text
    assert "torch suggests" in text and "seq" in text, text


def test_wrong_dtype_says_dtype() -> None:
    prog = itc.convert(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    with pytest.raises(itc.ItnetError, match=r"dtype float64 but the program takes float32") as err:
        itc.build(prog)(torch.randn(2, 4, dtype=torch.float64))
    assert "shape" not in str(err.value)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_dynamic_length_decoder_mask_folds_into_a_causal_support(impl) -> None:
    """The causal mask a decoder builds over a symbolic length (sizes only, no input data) is a support, so
    kernels skip the upper triangle and no N² mask is kept."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, use_cache=False,
                                  attn_implementation=impl)  # fmt: skip
    model = transformers.GPT2Model(cfg).eval()
    seq = torch.export.Dim("seq", min=2, max=64)
    prog = itc.convert(model, (torch.randint(0, 64, (2, 8)),), dynamic_shapes={"input_ids": {1: seq}})
    attn = [n for n in prog.transforms if n.family == "dot_exp"]
    assert len(attn) == 2 and all(n.attrs.support == "causal" and n.attrs.mask == "none" for n in attn)
    assert 'support="causal"' in str(prog) or "support=causal" in str(prog)
    built = itc.build(prog)
    for length in (8, 21):
        ids = torch.randint(0, 64, (2, length))
        with torch.no_grad():
            want = model(ids).last_hidden_state
        assert (built(ids).last_hidden_state - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize(
    ("window", "seq_max", "want"),
    [(5, 64, "window(5)"), (5, None, "window(5)"), (2000, None, None), (2000, 4096, None)],
)
def test_dynamic_length_sliding_window_mask_folds_only_when_sure(window, seq_max, want) -> None:
    """A sliding-window mask over a symbolic length folds into window(r); a window wider than every length the mask
    is evaluated at would look causal there, so over a range that goes past them it stays a mask (never a wrong
    causal support)."""
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                                     attn_implementation="sdpa", use_cache=False)  # fmt: skip
    model = transformers.MistralModel(cfg).train(False)
    seq = torch.export.Dim("seq", min=2, max=seq_max) if seq_max else torch.export.Dim("seq", min=2)
    batch = torch.export.Dim("batch", min=1, max=8)
    prog = itc.convert(model, (torch.randint(0, 64, (2, 9)),), dynamic_shapes={"input_ids": {0: batch, 1: seq}})
    [node] = prog.transforms
    if want is None:
        assert node.attrs.mask != "none" and node.attrs.support == "full"
    else:
        assert (node.attrs.support, node.attrs.mask) == (want, "none")
    built = itc.build(prog)
    for b, length in ((2, 7), (3, 23)):
        ids = torch.randint(0, 64, (b, length))
        with torch.no_grad():
            want_out = model(ids).last_hidden_state
        assert (built(ids).last_hidden_state - want_out).abs().max() <= 1e-5 * want_out.abs().max()


class _NoGradPositions(torch.nn.Module):
    """A ``@torch.no_grad()`` method inside forward (Speech2Text's sinusoidal positions): export wraps it in a
    higher-order op over a subgraph, which the importer inlines, its results detached."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    @torch.no_grad()
    def positions(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], dtype=x.dtype)[:, None] * torch.arange(1, 9, dtype=x.dtype)[None, :]
        return torch.sin(pos * 0.1) + self.proj(x).mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.positions(x)


def test_no_grad_regions_are_inlined_and_detached() -> None:
    torch.manual_seed(0)
    model = _NoGradPositions()
    x = torch.randn(2, 5, 8)
    prog = itc.convert(model, (x,))
    assert "detach" in str(prog)
    built = itc.build(prog)
    out, want = built(x), model(x)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()  # eager: no gradient through positions(), only through proj(x) outside it
    torch.testing.assert_close(built.gm.get_parameter("proj.weight").grad, model.proj.weight.grad)


def test_a_built_modules_state_dict_has_the_source_models_keys_both_ways() -> None:
    """Non-persistent buffers (BERT's position_ids, token_type_ids) stay out of it, as in the source model: a checkpoint
    of the source loads into the built module strictly, and one trained there loads back into the source."""
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    x = torch.randint(0, 100, (2, 7))
    mod = itc.build(itc.convert(model, (x,)))
    assert set(mod.gm.state_dict()) == set(model.state_dict())
    other = transformers.BertModel(cfg).eval()
    mod.gm.load_state_dict(other.state_dict())  # strict
    torch.testing.assert_close(mod(x).last_hidden_state, other(x).last_hidden_state, rtol=1e-5, atol=1e-5)
    model.load_state_dict(mod.gm.state_dict())
    torch.testing.assert_close(model(x).last_hidden_state, other(x).last_hidden_state, rtol=0, atol=0)
