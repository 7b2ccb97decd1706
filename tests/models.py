"""Real models for the acceptance tests, each built offline from a tiny config.

A ``Case`` carries the model, its example inputs and what the model itself says about its layers: the module paths
of its convolutions (every ``nn.Conv*d`` / ``nn.ConvTranspose*d``) and of its attention modules (found by class
name). The tests compare itnet's transforms against these, so the expected counts never come from itnet.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
HF_IMPLS = ("eager", "sdpa")

Inputs = tuple[tuple[object, ...], dict[str, object]]


@dataclass
class Case:
    name: str
    model: nn.Module
    args: tuple[object, ...]
    kwargs: dict[str, object] = field(default_factory=dict)
    # Module paths of the layers that must each become one it.transform, found from the model's own modules.
    conv_layers: list[str] = field(default_factory=list)
    attention_layers: list[str] = field(default_factory=list)
    # HF models: the config's own layer count, a second independent witness for the attention count.
    config_layers: int | None = None
    dynamic_shapes: object = None
    # For dynamic cases: inputs at another size of the dynamic dimension.
    inputs_at: Callable[[int], Inputs] | None = None
    # Generic ops that must survive conversion untouched (the compiler does not understand them).
    generic_ops: tuple[str, ...] = ()


def conv_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]


def class_paths(model: nn.Module, class_name: str) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == class_name]


def _finish(case: Case, attention_class: str | None) -> Case:
    case.model.eval()
    case.conv_layers = conv_paths(case.model)
    if attention_class is not None:
        case.attention_layers = class_paths(case.model, attention_class)
    return case


# ------------------------------------------------------------------------------------------------ transformers
def _tokens(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a mask with right padding in the second row (no row is fully masked)."""
    g = torch.Generator().manual_seed(seed + length)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - max(1, length // 4) :] = 0
    return ids, mask


_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def _text_case(name: str, model: nn.Module, cfg: object, attention_class: str, length: int, dynamic: bool) -> Case:
    vocab = cfg.vocab_size

    def inputs_at(n: int) -> Inputs:
        ids, mask = _tokens(2, n, vocab)
        return (), {"input_ids": ids, "attention_mask": mask}

    (args, kwargs) = inputs_at(length)
    dyn = None
    if dynamic:
        seq = torch.export.Dim("seq", min=2, max=32)
        dyn = {"input_ids": {1: seq}, "attention_mask": {1: seq}}
    case = Case(name, model, args, kwargs, config_layers=cfg.num_hidden_layers, dynamic_shapes=dyn,
                inputs_at=inputs_at if dynamic else None, generic_ops=("aten.layer_norm.default",))
    return _finish(case, attention_class)


def bert(impl: str, dynamic: bool = False) -> Case:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, max_position_embeddings=64, attn_implementation=impl, **_TEXT)
    return _text_case(f"bert-{impl}", transformers.BertModel(cfg), cfg, "BertSelfAttention", 8, dynamic)


def gpt2(impl: str, dynamic: bool = False) -> Case:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                  use_cache=False, attn_implementation=impl)
    return _text_case(f"gpt2-{impl}", transformers.GPT2Model(cfg), cfg, "GPT2Attention", 8, dynamic)


def llama(impl: str) -> Case:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, max_position_embeddings=64, num_key_value_heads=2,
                                   use_cache=False, attn_implementation=impl, **_TEXT)
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    case = _text_case(f"llama-{impl}", transformers.LlamaModel(cfg), cfg, "LlamaAttention", 8, False)
    case.generic_ops = ("aten.rsqrt.default", "aten.silu.default")
    return case


def vit(impl: str) -> Case:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, attn_implementation=impl, **_TEXT)
    x = torch.randn(2, 3, 16, 16)
    case = Case(f"vit-{impl}", transformers.ViTModel(cfg), (x,), config_layers=cfg.num_hidden_layers,
                generic_ops=("aten.layer_norm.default",))
    return _finish(case, "ViTAttention")


def wav2vec2(impl: str) -> Case:
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
                                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                      attn_implementation=impl, **_TEXT)
    x = torch.randn(2, 400)
    case = Case(f"wav2vec2-{impl}", transformers.Wav2Vec2Model(cfg), (x,), config_layers=cfg.num_hidden_layers,
                generic_ops=("aten.group_norm.default", "aten._weight_norm.default", "aten.layer_norm.default"))
    return _finish(case, "Wav2Vec2Attention")


def resnet() -> Case:
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck")
    model = transformers.ResNetModel(cfg)
    # Non-trivial running statistics, so a mistake in batch norm would show.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    case = Case("resnet", model, (torch.randn(2, 3, 32, 32),),
                generic_ops=("aten.batch_norm.default", "aten.max_pool2d.default"))
    return _finish(case, None)


# ----------------------------------------------------------------------------------------------------- torch.nn
class Encoder(nn.Module):
    """nn.TransformerEncoder (batch_first) called with a padding mask, a causal mask, or neither."""

    def __init__(self, mode: str):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.mode = mode

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "causal":
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            return self.enc(x, mask=mask, is_causal=True)
        return self.enc(x, src_key_padding_mask=pad)


def encoder(mode: str) -> Case:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    args: tuple[object, ...] = (x,)
    if mode == "padding":
        pad = torch.zeros(2, 8, dtype=torch.bool)
        pad[1, 6:] = True
        args = (x, pad)
    case = Case(f"encoder-{mode}", Encoder(mode), args, generic_ops=("aten.layer_norm.default",))
    return _finish(case, "MultiheadAttention")


class SelfAttention(nn.Module):
    """nn.MultiheadAttention used as self-attention; returns (output, weights or None) like the module itself."""

    def __init__(self, batch_first: bool, need_weights: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.mha(x, x, x, key_padding_mask=pad, need_weights=self.need_weights)


def mha(batch_first: bool, need_weights: bool, padding: bool) -> Case:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32) if batch_first else torch.randn(8, 2, 32)
    args: tuple[object, ...] = (x,)
    if padding:
        pad = torch.zeros(2, 8, dtype=torch.bool)
        pad[1, 5:] = True
        args = (x, pad)
    name = f"mha-bf{int(batch_first)}-w{int(need_weights)}-pad{int(padding)}"
    return _finish(Case(name, SelfAttention(batch_first, need_weights), args), "MultiheadAttention")


def cnn() -> Case:
    spec = importlib.util.spec_from_file_location("itnet_example_cnn", ROOT / "examples" / "cnn.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, args = module.make_model()
    return _finish(Case("cnn", model, tuple(args), generic_ops=("aten.linear.default",)), None)


# ------------------------------------------------------------------------------------------------------ registry
FACTORIES: dict[str, Callable[[], Case]] = {
    **{f"bert-{i}": (lambda i=i: bert(i)) for i in HF_IMPLS},
    **{f"gpt2-{i}": (lambda i=i: gpt2(i)) for i in HF_IMPLS},
    **{f"vit-{i}": (lambda i=i: vit(i)) for i in HF_IMPLS},
    **{f"llama-{i}": (lambda i=i: llama(i)) for i in HF_IMPLS},
    **{f"wav2vec2-{i}": (lambda i=i: wav2vec2(i)) for i in HF_IMPLS},
    "resnet": resnet,
    **{f"encoder-{m}": (lambda m=m: encoder(m)) for m in ("plain", "padding", "causal")},
    **{
        f"mha-bf{int(bf)}-w{int(w)}-pad{int(p)}": (lambda bf=bf, w=w, p=p: mha(bf, w, p))
        for bf in (True, False)
        for w in (True, False)
        for p in (True, False)
    },
    "cnn": cnn,
}

DYNAMIC: dict[str, Callable[[], Case]] = {
    **{f"bert-{i}-dyn": (lambda i=i: bert(i, dynamic=True)) for i in HF_IMPLS},
    **{f"gpt2-{i}-dyn": (lambda i=i: gpt2(i, dynamic=True)) for i in HF_IMPLS},
}
