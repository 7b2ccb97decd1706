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
    # Generic ops that must survive conversion untouched (the compiler does not understand them), with how many
    # times the model calls them, counted from its modules.
    generic_ops: dict[str, int] = field(default_factory=dict)
    # What each attention layer must be: heads, key/value heads and softmax scale, from the config (None: unchecked).
    heads: tuple[int, int, float] | None = None


def conv_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]


def class_paths(model: nn.Module, class_name: str) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == class_name]


def count(model: nn.Module, cls: type | str) -> int:
    return sum(1 for m in model.modules() if (type(m).__name__ == cls if isinstance(cls, str) else isinstance(m, cls)))


def _hf_heads(cfg: object) -> tuple[int, int, float]:
    heads = cfg.num_attention_heads
    return heads, getattr(cfg, "num_key_value_heads", None) or heads, (cfg.hidden_size // heads) ** -0.5


def _finish(case: Case, attention_class: str | None) -> Case:
    case.model.eval()
    case.conv_layers = conv_paths(case.model)
    if attention_class is not None:
        case.attention_layers = class_paths(case.model, attention_class)
    return case


# ------------------------------------------------------------------------------------------------ transformers
def _tokens(batch: int, length: int, vocab: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a mask that pads the second row by a quarter, on the right or on the left. Left padding in a
    causal model leaves the first query rows of that sequence with no key at all."""
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    pad = max(1, length // 4)
    if left:
        mask[1, :pad] = 0
    else:
        mask[1, length - pad :] = 0
    return ids, mask


# initializer_range 0.2 (not HF's 0.02): with tiny weights every attention row is nearly uniform and a wrong scale
# or mask would hide below the tolerance.
_TEXT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "initializer_range": 0.2,
}


def _text_case(
    name: str, model: nn.Module, cfg: object, attention_class: str, dynamic: bool, left: bool = False
) -> Case:
    vocab = cfg.vocab_size

    def inputs_at(n: int) -> Inputs:
        ids, mask = _tokens(2, n, vocab, left)
        return (), {"input_ids": ids, "attention_mask": mask}

    args, kwargs = inputs_at(8)
    dyn = None
    if dynamic:
        seq = torch.export.Dim("seq", min=2, max=32)
        dyn = {"input_ids": {1: seq}, "attention_mask": {1: seq}}
    case = Case(
        name + ("-dyn" if dynamic else ""),
        model,
        args,
        kwargs,
        config_layers=cfg.num_hidden_layers,
        dynamic_shapes=dyn,
        inputs_at=inputs_at if dynamic else None,
        heads=_hf_heads(cfg),
        generic_ops={"aten.layer_norm.default": count(model, nn.LayerNorm)},
    )
    return _finish(case, attention_class)


def bert(impl: str, dynamic: bool = False) -> Case:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, max_position_embeddings=64, attn_implementation=impl, **_TEXT)
    return _text_case(f"bert-{impl}", transformers.BertModel(cfg), cfg, "BertSelfAttention", dynamic)


def gpt2(impl: str, dynamic: bool = False) -> Case:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=100,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=64,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        attn_implementation=impl,
    )
    return _text_case(f"gpt2-{impl}", transformers.GPT2Model(cfg), cfg, "GPT2Attention", dynamic)


def llama(impl: str, left: bool = False) -> Case:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        max_position_embeddings=64,
        num_key_value_heads=2,
        use_cache=False,
        attn_implementation=impl,
        **_TEXT,
    )
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    model = transformers.LlamaModel(cfg)
    name = f"llama-{impl}" + ("-leftpad" if left else "")
    case = _text_case(name, model, cfg, "LlamaAttention", False, left)
    # RMSNorm is written out in ATen ops; its rsqrt stays generic.
    case.generic_ops = {"aten.rsqrt.default": count(model, "LlamaRMSNorm")}
    return case


def vit(impl: str) -> Case:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, attn_implementation=impl, **_TEXT)
    model = transformers.ViTModel(cfg)
    case = Case(
        f"vit-{impl}",
        model,
        (torch.randn(2, 3, 16, 16),),
        config_layers=cfg.num_hidden_layers,
        heads=_hf_heads(cfg),
        generic_ops={"aten.layer_norm.default": count(model, nn.LayerNorm)},
    )
    return _finish(case, "ViTAttention")


def wav2vec2(impl: str, padded: bool = False) -> Case:
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(
        conv_dim=(16, 16, 16),
        conv_stride=(5, 2, 2),
        conv_kernel=(10, 3, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        attn_implementation=impl,
        **_TEXT,
    )
    model = transformers.Wav2Vec2Model(cfg)
    generic = {
        "aten.group_norm.default": count(model, nn.GroupNorm),
        "aten.layer_norm.default": count(model, nn.LayerNorm),
        # The positional conv's weight is computed by weight_norm: the conv reads a value, not a parameter.
        "aten._weight_norm.default": count(model, "_WeightNorm"),
    }
    kwargs: dict[str, object] = {}
    if padded:  # the frame mask is derived from the sample mask (cumsum, index_put_, flip) inside the model
        kwargs["attention_mask"] = torch.ones(2, 400, dtype=torch.long)
        kwargs["attention_mask"][1, 300:] = 0
    name = f"wav2vec2-{impl}" + ("-mask" if padded else "")
    case = Case(
        name,
        model,
        (torch.randn(2, 400),),
        kwargs,
        config_layers=cfg.num_hidden_layers,
        heads=_hf_heads(cfg),
        generic_ops=generic,
    )
    return _finish(case, "Wav2Vec2Attention")


def resnet() -> Case:
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck")
    model = transformers.ResNetModel(cfg)
    # Non-trivial running statistics, so a mistake around batch norm would show.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    generic = {
        "aten.batch_norm.default": count(model, nn.BatchNorm2d),
        "aten.max_pool2d.default": count(model, nn.MaxPool2d),
    }
    return _finish(Case("resnet", model, (torch.randn(2, 3, 32, 32),), generic_ops=generic), None)


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
    model = Encoder(mode)
    generic = {"aten.layer_norm.default": count(model, nn.LayerNorm)}
    case = Case(f"encoder-{mode}", model, args, generic_ops=generic, heads=(4, 4, 8**-0.5))
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
    model = SelfAttention(batch_first, need_weights)
    # nn.MultiheadAttention runs two linear maps of its own: the packed in-projection and out_proj.
    generic = {"aten.linear.default": 2 * count(model, nn.MultiheadAttention)}
    # With weights, nn.MultiheadAttention computes on [batch * heads, L, D] and scales q itself: no per-head view.
    heads = None if need_weights else (4, 4, 8**-0.5)
    return _finish(Case(name, model, args, generic_ops=generic, heads=heads), "MultiheadAttention")


def cnn() -> Case:
    spec = importlib.util.spec_from_file_location("itnet_example_cnn", ROOT / "examples" / "cnn.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, args = module.make_model()
    generic = {"aten.linear.default": count(model, nn.Linear)}
    return _finish(Case("cnn", model, tuple(args), generic_ops=generic), None)


class CausalSelfAttention(nn.Module):
    """Attention written out by hand, nanoGPT style: a -inf fill from a causal buffer and GQA by repeating k/v heads."""

    def __init__(self, fill: str):
        super().__init__()
        self.qkv = nn.Linear(32, 64)  # q: 4 heads, k and v: 2 heads each, head dim 8
        self.proj = nn.Linear(32, 32)
        self.fill = fill
        self.register_buffer("causal", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split([32, 16, 16], dim=2)
        q = q.view(b, t, 4, 8).transpose(1, 2)
        k = k.view(b, t, 2, 8).transpose(1, 2)
        v = v.view(b, t, 2, 8).transpose(1, 2)
        if self.fill == "masked_fill":
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
            att = (q @ k.transpose(-2, -1)) * (1.0 / 8**0.5)
            att = att.masked_fill(self.causal[:, :, :t, :t] == 0, float("-inf"))
        else:
            k = k[:, :, None].expand(b, 2, 2, t, 8).reshape(b, 4, t, 8)
            v = v[:, :, None].expand(b, 2, 2, t, 8).reshape(b, 4, t, 8)
            att = torch.where(self.causal[:, :, :t, :t] != 0, (q @ k.transpose(-2, -1)) / 8**0.5, float("-inf"))
        y = torch.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class HandWritten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([CausalSelfAttention("masked_fill"), CausalSelfAttention("where")])
        self.norm = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(self.norm(x))
        return x


def handwritten() -> Case:
    torch.manual_seed(0)
    model = HandWritten()
    generic = {"aten.layer_norm.default": len(model.blocks) * count(model, nn.LayerNorm)}  # one norm, called per block
    case = Case("handwritten", model, (torch.randn(2, 12, 32),), generic_ops=generic, heads=(4, 2, 8**-0.5))
    return _finish(case, "CausalSelfAttention")


class ConvOps(nn.Module):
    """Convolutions that reach the graph as other ATen ops: conv_transpose1d, convolution, _convolution, a
    constant pad in front of conv1d. The functional ones have no module, so the model states how many it calls."""

    functional_convs = 3

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1)
        self.w1 = nn.Parameter(torch.randn(8, 6, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8))
        self.w2 = nn.Parameter(torch.randn(8, 8, 3) * 0.3)
        self.w3 = nn.Parameter(torch.randn(8, 4, 3) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.up(x))
        y = torch.convolution(y, self.w1, self.b1, [1], [1], [1], False, [0], 1)
        y = torch._convolution(y, self.w2, None, [2], [0], [1], False, [0], 1, False, False, True, True)
        return torch.nn.functional.conv1d(torch.nn.functional.pad(torch.tanh(y), (2, 1)), self.w3, None, groups=2)


def conv_ops() -> Case:
    torch.manual_seed(0)
    model = ConvOps()
    case = _finish(Case("conv-ops", model, (torch.randn(2, 4, 10),), generic_ops={"aten.tanh.default": 1}), None)
    case.conv_layers += [""] * model.functional_convs  # functional calls belong to the root module
    return case


# ------------------------------------------------------------------------------------------------------ registry
FACTORIES: dict[str, Callable[[], Case]] = {
    **{f"bert-{i}": (lambda i=i: bert(i)) for i in HF_IMPLS},
    **{f"gpt2-{i}": (lambda i=i: gpt2(i)) for i in HF_IMPLS},
    **{f"vit-{i}": (lambda i=i: vit(i)) for i in HF_IMPLS},
    **{f"llama-{i}": (lambda i=i: llama(i)) for i in HF_IMPLS},
    **{f"wav2vec2-{i}": (lambda i=i: wav2vec2(i)) for i in HF_IMPLS},
    **{f"wav2vec2-{i}-mask": (lambda i=i: wav2vec2(i, padded=True)) for i in HF_IMPLS},
    # HF eager writes masked logits as finfo.min (never -inf): rows without any key stay finite in every lowering.
    "llama-eager-leftpad": lambda: llama("eager", left=True),
    "llama-sdpa-leftpad": lambda: llama("sdpa", left=True),
    "resnet": resnet,
    **{f"encoder-{m}": (lambda m=m: encoder(m)) for m in ("plain", "padding", "causal")},
    **{
        f"mha-bf{int(bf)}-w{int(w)}-pad{int(p)}": (lambda bf=bf, w=w, p=p: mha(bf, w, p))
        for bf in (True, False)
        for w in (True, False)
        for p in (True, False)
    },
    "cnn": cnn,
    "handwritten": handwritten,
    "conv-ops": conv_ops,
}

DYNAMIC: dict[str, Callable[[], Case]] = {
    **{f"bert-{i}-dyn": (lambda i=i: bert(i, dynamic=True)) for i in HF_IMPLS},
    **{f"gpt2-{i}-dyn": (lambda i=i: gpt2(i, dynamic=True)) for i in HF_IMPLS},
}

# Cases with no attention layer: the fused plan (attention only in the torch backend) does not apply to them.
ATTENTION_FREE = frozenset({"resnet", "cnn", "conv-ops"})
# nn.MultiheadAttention with need_weights attends over [batch * heads, L, D] with q pre-scaled: no heads or scale of
# the module to compare the transform's attributes with.
FLAT_HEADS = frozenset(n for n in FACTORIES if n.startswith("mha-") and "-w1-" in n)
