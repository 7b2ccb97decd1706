"""Coverage survey: convert many real model definitions and report what itnet captures.

Every model is built offline from a tiny config (transformers: hidden 32, 2 layers, 2-4 heads, vocab 128, eager
attention unless named ``-sdpa``; or a ``torch.nn`` composition), put in eval mode, converted with
``itc.convert(model, args, kwargs)``, built (``--backend torch`` by default, or ``triton``) and run on the example
inputs (batch 2: token ids with a right-padded attention mask, pixels, audio samples or features). Variants:
``-sdpa`` (SDPA attention), ``<decoder>-nomask`` (no padding mask, so the causal / sliding-window mask is built
from sizes alone and should fold into ``support="causal"`` / ``"window(r)"``), ``-experts-<impl>`` (transformers'
MoE experts implementation; the default on CPU float32 is ``grouped_mm``). Per model the survey reports:

- whether it constructed and converted (the first line of the error otherwise, the innermost itnet frame and the
  innermost model frame of the root cause, e.g. the line of data-dependent control flow export could not trace);
- the transforms captured, per family (``dot_exp`` attention, ``stationary`` convolution, ``gated`` LSTM/GRU/RNN,
  ``ssm`` Mamba mixers, ``wkv`` RWKV time mixing), and the ``dot_exp`` supports (``+mask``: a mask input,
  ``+mod``: a score expression);
- what the model itself holds, found from its modules alone (never from itnet): attention-like modules (a heuristic:
  the innermost modules whose class name contains ``Attention``/``Attn`` (not ``...Output``, ``...Mask``, ...), or
  that own q/k/v projections, separate or fused, or a packed ``in_proj_weight``), ``nn.Conv*d`` /
  ``nn.ConvTranspose*d`` modules, ``nn.RNNBase`` modules, SSM mixers (a direct ``A_log`` parameter), WKV mixers
  (``time_decay`` and ``time_first`` parameters) and other recurrences by class name (RG-LRU, xLSTM cells,
  DeltaNet, lightning / linear attention), which any ``ssm``/``gated``/``wkv`` transform may cover;
- which of those module paths no transform of the expected family came from, with the generic ops those layers
  kept (``--explain`` prints them: the ops around the first softmax show what broke an attention pattern);
- the relative Frobenius error of every floating output of the built module against eager (the first floating one
  and the largest; eager runs with autograd on, as export sees the model);
- the time of each step (construct, eager forward, convert, build, built forward).

A model is *fully captured* when every module found has a transform of its family (``captured/found``; ``+N`` are
transforms on no found module: a shared module called twice, an attention class the heuristic misses). This is a
survey, not a test: one model's failure never stops the run, and nothing is asserted. The whole run takes about
1.5 minutes on 2 CPU cores.

    HF_HUB_OFFLINE=1 python bench/model_survey.py [--only name,...] [--skip name,...] [--list] [--json out.json]
                                                  [--backend torch|triton] [--explain] [--seq N]

``--only``/``--skip`` take exact names or fnmatch globs (``--only 'bert*,gpt2*'``). For ``--backend triton`` on a
machine without a GPU, ``TRITON_INTERPRET=1`` is set before torch is imported; the layers that ran on torch instead
(``module.fallbacks``) are reported per model.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import os
import re
import shutil
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _gpu_present() -> bool:
    """Without importing torch (TRITON_INTERPRET must be set before it is)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated model names or globs")
    ap.add_argument("--skip", default="", help="comma-separated model names or globs to leave out")
    ap.add_argument("--json", default=None, help="write every record to this JSON file")
    ap.add_argument("--backend", default="torch", choices=("torch", "triton"))
    ap.add_argument("--explain", action="store_true", help="print the generic ops of every missing layer")
    ap.add_argument("--list", action="store_true", help="list the model names and exit")
    ap.add_argument("--seq", type=int, default=8, help="sequence length of text inputs (default 8)")
    return ap.parse_args(argv)


ARGS = _parse_args(None) if __name__ == "__main__" else None
if ARGS is not None and ARGS.backend == "triton" and not _gpu_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

SEQ = ARGS.seq if ARGS is not None else 8
VOCAB = 128
BATCH = 2


# ------------------------------------------------------------------------------------------------- model registry
@dataclass
class Spec:
    name: str
    group: str
    make: Callable[[], tuple[nn.Module, tuple[object, ...], dict[str, object]]]
    note: str = ""
    # "causal": every self-attention of the model is causal (or a causal window), with no padding mask given, so a
    # dot_exp with support="full" and no mask input means the causal structure was not recovered.
    expect_support: str | None = None


SPECS: list[Spec] = []


def spec(name: str, group: str, note: str = "") -> Callable:
    def deco(fn: Callable) -> Callable:
        SPECS.append(Spec(name, group, fn, note))
        return fn

    return deco


def _tokens(seq: int = SEQ, vocab: int = VOCAB, pad: int = 2, low: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (ids below ``low`` are left to special tokens) and a mask that right-pads the second row."""
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(low, vocab, (BATCH, seq), generator=g)
    mask = torch.ones(BATCH, seq, dtype=torch.long)
    if pad:
        mask[1, seq - pad :] = 0
    return ids, mask


# Extra config keywords for every ``_hf`` call (set by ``_with`` while a variant builds its model).
_HF_EXTRA: dict[str, object] = {}


def _hf(config: str, model: str, impl: str | None = "eager", **cfg: object) -> nn.Module:
    """transformers ``model`` from ``config(**cfg)``; ``impl`` is the attention implementation (None: default)."""
    import transformers

    cfg.setdefault("initializer_range", 0.2)  # not 0.02: near-uniform attention rows would hide a wrong scale/mask
    cfg.update(_HF_EXTRA)
    if impl is not None:
        cfg["attn_implementation"] = impl
    conf = getattr(transformers, config)(**cfg)
    if getattr(conf, "use_cache", None):
        conf.use_cache = False
    torch.manual_seed(0)
    return getattr(transformers, model)(conf)


def _text(model: nn.Module, mask: bool = True, **extra: object):
    ids, m = _tokens()
    kw: dict[str, object] = {"input_ids": ids}
    if mask:
        kw["attention_mask"] = m
    kw.update(extra)
    return model, (), kw


def _seq2seq(model: nn.Module, dec: int = 5, start: int = 1):
    ids, m = _tokens()
    g = torch.Generator().manual_seed(1)
    dec_ids = torch.randint(3, VOCAB, (BATCH, dec), generator=g)
    dec_ids[:, 0] = start
    return model, (), {"input_ids": ids, "attention_mask": m, "decoder_input_ids": dec_ids}


def _pixels(model: nn.Module, size: int = 32, channels: int = 3, key: str = "pixel_values"):
    g = torch.Generator().manual_seed(0)
    return model, (), {key: torch.randn(BATCH, channels, size, size, generator=g)}


def _audio(model: nn.Module, samples: int = 800):
    g = torch.Generator().manual_seed(0)
    return model, (), {"input_values": torch.randn(BATCH, samples, generator=g)}


BERTISH = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
LLAMAISH = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
BARTISH = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
)
VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    num_channels=3,
)
AUDIO = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    conv_dim=(16, 16, 16),
    conv_stride=(5, 2, 2),
    conv_kernel=(10, 3, 3),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)


# --- encoders (BERT family)
for _impl in ("eager", "sdpa"):

    @spec(f"bert-{_impl}", "encoder")
    def _bert(impl=_impl):
        return _text(_hf("BertConfig", "BertModel", impl, **BERTISH))


@spec("roberta", "encoder")
def _roberta():
    return _text(_hf("RobertaConfig", "RobertaModel", **BERTISH))


@spec("xlm-roberta", "encoder")
def _xlmr():
    return _text(_hf("XLMRobertaConfig", "XLMRobertaModel", **BERTISH))


@spec("camembert", "encoder")
def _camembert():
    return _text(_hf("CamembertConfig", "CamembertModel", **BERTISH))


@spec("data2vec-text", "encoder")
def _d2v_text():
    return _text(_hf("Data2VecTextConfig", "Data2VecTextModel", **BERTISH))


@spec("albert", "encoder")
def _albert():
    return _text(_hf("AlbertConfig", "AlbertModel", embedding_size=16, **BERTISH))


@spec("distilbert", "encoder")
def _distilbert():
    cfg = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=VOCAB, max_position_embeddings=64)
    return _text(_hf("DistilBertConfig", "DistilBertModel", **cfg))


@spec("electra", "encoder")
def _electra():
    return _text(_hf("ElectraConfig", "ElectraModel", embedding_size=16, **BERTISH))


@spec("deberta", "encoder", "v1, relative attention c2p|p2c")
def _deberta():
    cfg = dict(relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=16, **BERTISH)
    return _text(_hf("DebertaConfig", "DebertaModel", **cfg))


@spec("deberta-v2", "encoder", "relative attention c2p|p2c, buckets")
def _deberta_v2():
    cfg = dict(
        relative_attention=True, pos_att_type=["c2p", "p2c"], position_buckets=8, max_relative_positions=16, **BERTISH
    )
    return _text(_hf("DebertaV2Config", "DebertaV2Model", **cfg))


@spec("mpnet", "encoder", "relative position bias (32 buckets: MPNet's bucketing ignores the config's count)")
def _mpnet():
    return _text(_hf("MPNetConfig", "MPNetModel", **BERTISH))


@spec("xlnet", "encoder", "relative attention, einsum")
def _xlnet():
    cfg = dict(d_model=32, n_layer=2, n_head=4, d_inner=64, vocab_size=VOCAB, use_mems_eval=False)
    return _text(_hf("XLNetConfig", "XLNetModel", None, **cfg))


@spec("funnel", "encoder", "pooling between blocks, relative attention")
def _funnel():
    cfg = dict(block_sizes=[1, 1], d_model=32, n_head=4, d_head=8, d_inner=64, vocab_size=VOCAB)
    return _text(_hf("FunnelConfig", "FunnelBaseModel", None, **cfg))


@spec("convbert", "encoder", "span-based dynamic conv + attention")
def _convbert():
    return _text(_hf("ConvBertConfig", "ConvBertModel", None, embedding_size=32, conv_kernel_size=3, **BERTISH))


@spec("mobilebert", "encoder")
def _mobilebert():
    cfg = dict(BERTISH, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=1)
    return _text(_hf("MobileBertConfig", "MobileBertModel", **cfg))


@spec("bigbird-full", "encoder", "attention_type=original_full")
def _bigbird():
    return _text(_hf("BigBirdConfig", "BigBirdModel", **BERTISH, attention_type="original_full"))


@spec("longformer", "encoder", "sliding window 4 + global")
def _longformer():
    cfg = dict(BERTISH, attention_window=[4, 4], pad_token_id=1)
    return _text(_hf("LongformerConfig", "LongformerModel", None, **cfg))


# --- decoders
for _impl in ("eager", "sdpa"):

    @spec(f"gpt2-{_impl}", "decoder")
    def _gpt2(impl=_impl):
        cfg = dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64, vocab_size=VOCAB, bos_token_id=0)
        return _text(_hf("GPT2Config", "GPT2Model", impl, eos_token_id=0, **cfg))


@spec("gpt-neo", "decoder", "global + local(window 4) layers")
def _gpt_neo():
    cfg = dict(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        max_position_embeddings=64,
        vocab_size=VOCAB,
    )
    return _text(_hf("GPTNeoConfig", "GPTNeoModel", **cfg))


@spec("gpt-j", "decoder", "partial rotary")
def _gptj():
    cfg = dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, rotary_dim=4, n_positions=64, vocab_size=VOCAB)
    return _text(_hf("GPTJConfig", "GPTJModel", **cfg))


@spec("gpt-neox", "decoder")
def _gpt_neox():
    cfg = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        rotary_pct=0.5,
        max_position_embeddings=64,
        vocab_size=VOCAB,
    )
    return _text(_hf("GPTNeoXConfig", "GPTNeoXModel", **cfg))


@spec("codegen", "decoder")
def _codegen():
    cfg = dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, rotary_dim=4, n_positions=64, n_ctx=64, vocab_size=VOCAB)
    return _text(_hf("CodeGenConfig", "CodeGenModel", **cfg))


@spec("opt", "decoder")
def _opt():
    cfg = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        vocab_size=VOCAB,
        pad_token_id=1,
    )
    return _text(_hf("OPTConfig", "OPTModel", **cfg))


@spec("bloom", "decoder", "ALiBi via baddbmm")
def _bloom():
    return _text(_hf("BloomConfig", "BloomModel", None, hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB))


@spec("falcon", "decoder", "multi-query, rotary")
def _falcon():
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
    return _text(_hf("FalconConfig", "FalconModel", **cfg))


@spec("falcon-alibi", "decoder", "alibi=True, new_decoder_architecture, 2 kv heads")
def _falcon_alibi():
    cfg = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        alibi=True,
        vocab_size=VOCAB,
    )
    return _text(_hf("FalconConfig", "FalconModel", **cfg))


@spec("mpt", "decoder", "ALiBi")
def _mpt():
    cfg = dict(d_model=32, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=64, vocab_size=VOCAB)
    return _text(_hf("MptConfig", "MptModel", None, **cfg))


for _impl in ("eager", "sdpa"):

    @spec(f"llama-{_impl}", "decoder", "GQA 4/2")
    def _llama(impl=_impl):
        return _text(_hf("LlamaConfig", "LlamaModel", impl, **LLAMAISH))


@spec("mistral", "decoder", "sliding_window=4")
def _mistral():
    return _text(_hf("MistralConfig", "MistralModel", sliding_window=4, **LLAMAISH))


@spec("mixtral", "decoder", "MoE 4 experts top-2, sliding_window=4")
def _mixtral():
    cfg = dict(LLAMAISH, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)
    return _text(_hf("MixtralConfig", "MixtralModel", **cfg))


for _impl in ("eager", "sdpa"):

    @spec(f"qwen2-{_impl}", "decoder", "qkv bias")
    def _qwen2(impl=_impl):
        return _text(_hf("Qwen2Config", "Qwen2Model", impl, **LLAMAISH))


@spec("qwen3", "decoder", "q/k norm, head_dim 8")
def _qwen3():
    return _text(_hf("Qwen3Config", "Qwen3Model", head_dim=8, **LLAMAISH))


@spec("qwen2-moe", "decoder", "MoE + shared expert")
def _qwen2_moe():
    cfg = dict(
        LLAMAISH, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    )
    return _text(_hf("Qwen2MoeConfig", "Qwen2MoeModel", **cfg))


@spec("phi", "decoder", "partial rotary, dense qkv")
def _phi():
    cfg = dict(LLAMAISH, partial_rotary_factor=0.5)
    return _text(_hf("PhiConfig", "PhiModel", **cfg))


@spec("phi3", "decoder", "fused qkv_proj")
def _phi3():
    return _text(_hf("Phi3Config", "Phi3Model", **LLAMAISH))


@spec("gemma", "decoder", "head_dim 8")
def _gemma():
    return _text(_hf("GemmaConfig", "GemmaModel", head_dim=8, **LLAMAISH))


@spec("gemma2", "decoder", "softcap 50, sliding_window=4 on alternate layers")
def _gemma2():
    cfg = dict(LLAMAISH, head_dim=8, sliding_window=4, query_pre_attn_scalar=8, attn_logit_softcapping=50.0)
    return _text(_hf("Gemma2Config", "Gemma2Model", **cfg))


@spec("gemma3-text", "decoder", "sliding + full layers, q/k norm")
def _gemma3():
    cfg = dict(
        LLAMAISH,
        head_dim=8,
        sliding_window=4,
        query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    return _text(_hf("Gemma3TextConfig", "Gemma3TextModel", **cfg))


@spec("stablelm", "decoder", "partial rotary")
def _stablelm():
    return _text(_hf("StableLmConfig", "StableLmModel", partial_rotary_factor=0.5, **LLAMAISH))


@spec("starcoder2", "decoder", "sliding_window=4, biases")
def _starcoder2():
    return _text(_hf("Starcoder2Config", "Starcoder2Model", sliding_window=4, **LLAMAISH))


@spec("olmo", "decoder")
def _olmo():
    return _text(_hf("OlmoConfig", "OlmoModel", **LLAMAISH))


@spec("olmo2", "decoder", "q/k norm")
def _olmo2():
    return _text(_hf("Olmo2Config", "Olmo2Model", **LLAMAISH))


@spec("granite", "decoder", "attention_multiplier scale")
def _granite():
    return _text(_hf("GraniteConfig", "GraniteModel", attention_multiplier=0.3, **LLAMAISH))


@spec("cohere", "decoder", "parallel block, interleaved rotary")
def _cohere():
    return _text(_hf("CohereConfig", "CohereModel", **LLAMAISH))


@spec("persimmon", "decoder", "fused qkv, q/k layernorm")
def _persimmon():
    cfg = dict(LLAMAISH)
    cfg.pop("num_key_value_heads")
    return _text(_hf("PersimmonConfig", "PersimmonModel", **cfg))


def _with(make: Callable, drop: tuple[str, ...] = (), hf: dict[str, object] | None = None) -> Callable:
    """``make`` with some inputs dropped, or with extra config keywords for every ``_hf`` call it makes."""

    def f():
        global _HF_EXTRA
        old, _HF_EXTRA = _HF_EXTRA, dict(hf or {})
        try:
            model, args, kwargs = make()
        finally:
            _HF_EXTRA = old
        return model, args, {k: v for k, v in kwargs.items() if k not in drop}

    return f


# Decoders without a padding mask: transformers builds the causal (or sliding-window) mask from sizes alone, which
# itnet should fold into support="causal" / "window(r)".
for _s in [s for s in SPECS if s.group == "decoder"]:
    SPECS.append(Spec(_s.name + "-nomask", "decoder", _with(_s.make, drop=("attention_mask",)), _s.note, "causal"))

# --- mixture of experts: transformers' default experts implementation on CPU float32 ("grouped_mm") calls the
# custom op transformers::grouped_mm_fallback; "batched_mm" is plain batched matmuls over gathered expert weights,
# "eager" loops over the experts that were hit (a data-dependent loop).
for _name in ("mixtral", "qwen2-moe"):
    _s = next(s for s in SPECS if s.name == _name)
    for _impl in ("batched_mm", "eager"):
        SPECS.append(
            Spec(
                f"{_name}-experts-{_impl}",
                "decoder",
                _with(_s.make, hf={"experts_implementation": _impl}),
                f"experts_implementation={_impl}",
            )
        )


# --- encoder-decoders
@spec("t5-encoder", "seq2seq", "relative position buckets")
def _t5_enc():
    cfg = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB)
    return _text(_hf("T5Config", "T5EncoderModel", relative_attention_num_buckets=8, **cfg))


@spec("t5", "seq2seq", "encoder-decoder")
def _t5():
    cfg = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB, decoder_start_token_id=0)
    return _seq2seq(_hf("T5Config", "T5Model", relative_attention_num_buckets=8, **cfg), start=0)


@spec("umt5-encoder", "seq2seq", "per-layer relative bias")
def _umt5():
    cfg = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB)
    return _text(_hf("UMT5Config", "UMT5EncoderModel", relative_attention_num_buckets=8, **cfg))


for _kind in ("local", "transient-global"):

    @spec(f"longt5-{_kind}", "seq2seq", "encoder only, local_radius 2, global block 4")
    def _longt5(kind=_kind):
        cfg = dict(
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            vocab_size=VOCAB,
            local_radius=2,
            global_block_size=4,
            encoder_attention_type=kind,
            relative_attention_num_buckets=8,
        )
        return _text(_hf("LongT5Config", "LongT5EncoderModel", **cfg))


for _impl in ("eager", "sdpa"):

    @spec(f"bart-{_impl}", "seq2seq")
    def _bart(impl=_impl):
        return _seq2seq(_hf("BartConfig", "BartModel", impl, **BARTISH), start=2)


@spec("mbart", "seq2seq")
def _mbart():
    return _seq2seq(_hf("MBartConfig", "MBartModel", **BARTISH), start=2)


@spec("pegasus", "seq2seq", "sinusoidal positions")
def _pegasus():
    cfg = dict(BARTISH, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return _seq2seq(_hf("PegasusConfig", "PegasusModel", **cfg), start=0)


@spec("marian", "seq2seq")
def _marian():
    cfg = dict(BARTISH, pad_token_id=1, eos_token_id=2, decoder_start_token_id=1, decoder_vocab_size=VOCAB)
    return _seq2seq(_hf("MarianConfig", "MarianModel", **cfg), start=1)


@spec("whisper", "seq2seq", "conv front end, 16 mel bins, 32 frames")
def _whisper():
    cfg = dict(
        BARTISH,
        num_mel_bins=16,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    cfg.pop("max_position_embeddings")
    model = _hf("WhisperConfig", "WhisperModel", **cfg)
    g = torch.Generator().manual_seed(0)
    dec = torch.randint(3, VOCAB, (BATCH, 5), generator=g)
    return model, (), {"input_features": torch.randn(BATCH, 16, 32, generator=g), "decoder_input_ids": dec}


# --- audio encoders
for _impl in ("eager", "sdpa"):

    @spec(f"wav2vec2-{_impl}", "audio")
    def _w2v(impl=_impl):
        return _audio(_hf("Wav2Vec2Config", "Wav2Vec2Model", impl, **AUDIO))


@spec("hubert", "audio")
def _hubert():
    return _audio(_hf("HubertConfig", "HubertModel", **AUDIO))


@spec("wavlm", "audio", "gated relative position bias")
def _wavlm():
    return _audio(_hf("WavLMConfig", "WavLMModel", None, num_buckets=16, max_bucket_distance=32, **AUDIO))


@spec("data2vec-audio", "audio")
def _d2v_audio():
    return _audio(_hf("Data2VecAudioConfig", "Data2VecAudioModel", conv_pos_kernel_size=4, **AUDIO))


# --- vision
for _impl in ("eager", "sdpa"):

    @spec(f"vit-{_impl}", "vision")
    def _vit(impl=_impl):
        return _pixels(_hf("ViTConfig", "ViTModel", impl, **VISION))


@spec("deit", "vision")
def _deit():
    return _pixels(_hf("DeiTConfig", "DeiTModel", **VISION))


@spec("beit", "vision", "relative position bias per layer")
def _beit():
    return _pixels(_hf("BeitConfig", "BeitModel", use_relative_position_bias=True, **VISION))


@spec("dinov2", "vision")
def _dinov2():
    return _pixels(_hf("Dinov2Config", "Dinov2Model", mlp_ratio=2, **VISION))


@spec("clip-text", "vision", "causal + padding mask")
def _clip_text():
    cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        eos_token_id=2,
    )
    return _text(_hf("CLIPTextConfig", "CLIPTextModel", **cfg))


@spec("clip-vision", "vision")
def _clip_vision():
    return _pixels(_hf("CLIPVisionConfig", "CLIPVisionModel", **VISION))


@spec("siglip-vision", "vision")
def _siglip_vision():
    return _pixels(_hf("SiglipVisionConfig", "SiglipVisionModel", **VISION))


@spec("swin", "vision", "windows 4, shifted (depth 2)")
def _swin():
    cfg = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=4)
    return _pixels(_hf("SwinConfig", "SwinModel", **cfg))


@spec("swinv2", "vision", "cosine attention, log-CPB")
def _swinv2():
    cfg = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=4)
    return _pixels(_hf("Swinv2Config", "Swinv2Model", **cfg))


@spec("segformer", "vision", "efficient attention (sr conv)")
def _segformer():
    cfg = dict(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=32,
    )
    return _pixels(_hf("SegformerConfig", "SegformerModel", None, **cfg))


@spec("mobilevit", "vision", "conv + unfolded-patch attention")
def _mobilevit():
    cfg = dict(
        image_size=32,
        patch_size=2,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 40],
        num_attention_heads=2,
    )
    return _pixels(_hf("MobileViTConfig", "MobileViTModel", None, **cfg))


@spec("convnext", "vision")
def _convnext():
    return _pixels(_hf("ConvNextConfig", "ConvNextModel", None, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))


@spec("convnextv2", "vision")
def _convnextv2():
    return _pixels(_hf("ConvNextV2Config", "ConvNextV2Model", None, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))


@spec("resnet-basic", "vision")
def _resnet():
    cfg = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    model = _hf("ResNetConfig", "ResNetModel", None, **cfg)
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return _pixels(model)


@spec("regnet", "vision", "grouped convs, squeeze-excitation")
def _regnet():
    cfg = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4)
    return _pixels(_hf("RegNetConfig", "RegNetModel", None, **cfg))


@spec("mobilenet-v2", "vision", "depthwise convs")
def _mobilenet_v2():
    cfg = dict(image_size=32, depth_multiplier=0.25, min_depth=4)
    return _pixels(_hf("MobileNetV2Config", "MobileNetV2Model", None, **cfg))


# --- state-space / recurrent
@spec("mamba", "ssm")
def _mamba():
    cfg = dict(hidden_size=32, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=4, vocab_size=VOCAB)
    return _text(_hf("MambaConfig", "MambaModel", None, use_mambapy=False, **cfg), mask=False)


@spec("mamba2", "ssm")
def _mamba2():
    cfg = dict(
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        expand=2,
        head_dim=16,
        num_heads=4,
        n_groups=1,
        conv_kernel=4,
        chunk_size=8,
        vocab_size=VOCAB,
    )
    return _text(_hf("Mamba2Config", "Mamba2Model", None, **cfg), mask=False)


@spec("falcon-mamba", "ssm", "RMS-normed dt/B/C")
def _falcon_mamba():
    cfg = dict(hidden_size=32, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=4, vocab_size=VOCAB)
    return _text(_hf("FalconMambaConfig", "FalconMambaModel", None, use_mambapy=False, **cfg), mask=False)


@spec("jamba", "ssm", "mamba + attention layers, MoE every 2nd")
def _jamba():
    cfg = dict(
        LLAMAISH,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=2,
        num_experts_per_tok=1,
        mamba_d_state=4,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=4,
        use_mamba_kernels=False,
    )
    return _text(_hf("JambaConfig", "JambaModel", **cfg))


@spec("bamba", "ssm", "mamba2 + attention")
def _bamba():
    cfg = dict(
        LLAMAISH,
        attn_layer_indices=[1],
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_chunk_size=8,
        mamba_expand=2,
    )
    return _text(_hf("BambaConfig", "BambaModel", **cfg))


@spec("rwkv", "ssm", "WKV time mixing")
def _rwkv():
    cfg = dict(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64, vocab_size=VOCAB)
    return _text(_hf("RwkvConfig", "RwkvModel", None, context_length=16, **cfg), mask=False)


@spec("recurrent-gemma", "ssm", "RG-LRU + local attention")
def _recurrent_gemma():
    cfg = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=64,
        lru_width=32,
        attention_window_size=4,
        conv1d_width=4,
        vocab_size=VOCAB,
        block_types=["recurrent", "attention"],
    )
    return _text(_hf("RecurrentGemmaConfig", "RecurrentGemmaModel", **cfg))


@spec("jamba-experts-batched_mm", "ssm", "experts_implementation=batched_mm")
def _jamba_bmm():
    return _with(_jamba, hf={"experts_implementation": "batched_mm"})()


# --- newer / unusual architectures (stress cases)
MOE = {"experts_implementation": "batched_mm"}  # past transformers::grouped_mm_fallback (see the MoE variants)


@spec("xlstm", "stress", "mLSTM blocks, native chunkwise kernels")
def _xlstm():
    cfg = dict(
        hidden_size=32,
        embedding_dim=32,
        num_hidden_layers=2,
        num_blocks=2,
        num_heads=4,
        vocab_size=VOCAB,
    )
    return _text(_hf("xLSTMConfig", "xLSTMModel", None, **cfg), mask=False)


@spec("lfm2", "stress", "short gated convs + attention")
def _lfm2():
    cfg = dict(LLAMAISH, layer_types=["conv", "full_attention"], conv_L_cache=3)
    return _text(_hf("Lfm2Config", "Lfm2Model", **cfg))


@spec("modernbert", "stress", "alternating global / local(window 4) attention, unpadded")
def _modernbert():
    cfg = dict(
        BERTISH,
        local_attention=4,
        layer_types=["full_attention", "sliding_attention"],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    )
    return _text(_hf("ModernBertConfig", "ModernBertModel", **cfg))


@spec("esm", "stress", "rotary BERT")
def _esm():
    cfg = dict(BERTISH, position_embedding_type="rotary", pad_token_id=1, mask_token_id=2)
    return _text(_hf("EsmConfig", "EsmModel", **cfg))


@spec("nystromformer", "stress", "Nystrom landmarks (approximate attention)")
def _nystromformer():
    cfg = dict(BERTISH, num_landmarks=4, segment_means_seq_len=SEQ, conv_kernel_size=3)
    # With a padding mask its eager forward fails at these sizes (the mask is added to the landmark scores).
    return _text(_hf("NystromformerConfig", "NystromformerModel", None, **cfg), mask=False)


@spec("reformer", "stress", "local + LSH attention, axial positions")
def _reformer():
    cfg = dict(
        hidden_size=32,
        attn_layers=["local", "lsh"],
        num_attention_heads=2,
        attention_head_size=16,
        feed_forward_size=64,
        axial_pos_shape=(2, 4),
        axial_pos_embds_dim=(16, 16),
        local_attn_chunk_length=4,
        lsh_attn_chunk_length=4,
        num_buckets=2,
        num_hashes=1,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        is_decoder=False,
    )
    return _text(_hf("ReformerConfig", "ReformerModel", None, **cfg))


@spec("sew-d", "stress", "audio, DeBERTa-style disentangled attention")
def _sewd():
    cfg = dict(AUDIO, squeeze_factor=1, max_position_embeddings=64, position_buckets=8, relative_attention=True)
    return _audio(_hf("SEWDConfig", "SEWDModel", None, **cfg))


@spec("led", "stress", "Longformer encoder-decoder")
def _led():
    cfg = dict(BARTISH, attention_window=[4, 4], max_encoder_position_embeddings=64, max_decoder_position_embeddings=64)
    cfg.pop("max_position_embeddings")
    return _seq2seq(_hf("LEDConfig", "LEDModel", None, **cfg), start=2)


@spec("speech2text", "stress", "conv subsampler + enc-dec")
def _speech2text():
    cfg = dict(
        BARTISH,
        input_feat_per_channel=16,
        num_conv_layers=2,
        conv_channels=16,
        conv_kernel_sizes=[5, 5],
        max_source_positions=64,
        max_target_positions=64,
        input_channels=1,
    )
    cfg.pop("max_position_embeddings")
    model = _hf("Speech2TextConfig", "Speech2TextModel", **cfg)
    g = torch.Generator().manual_seed(0)
    dec = torch.randint(3, VOCAB, (BATCH, 5), generator=g)
    return model, (), {"input_features": torch.randn(BATCH, 32, 16, generator=g), "decoder_input_ids": dec}


@spec("moonshine", "stress", "audio conv stem + rotary enc-dec")
def _moonshine():
    cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        encoder_num_hidden_layers=2,
        decoder_num_hidden_layers=2,
        encoder_num_attention_heads=4,
        decoder_num_attention_heads=4,
        encoder_num_key_value_heads=4,  # with fewer, its eager cross-attention views q with the kv head count
        decoder_num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    model = _hf("MoonshineConfig", "MoonshineModel", **cfg)
    g = torch.Generator().manual_seed(0)
    dec = torch.randint(3, VOCAB, (BATCH, 5), generator=g)
    return model, (), {"input_values": torch.randn(BATCH, 1600, generator=g), "decoder_input_ids": dec}


@spec("patchtst", "stress", "time series patches")
def _patchtst():
    cfg = dict(
        num_input_channels=3,
        context_length=32,
        patch_length=8,
        patch_stride=8,
        d_model=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
    )
    model = _hf("PatchTSTConfig", "PatchTSTModel", None, **cfg)
    g = torch.Generator().manual_seed(0)
    return model, (), {"past_values": torch.randn(BATCH, 32, 3, generator=g)}


@spec("levit", "vision", "conv stem, attention biases, subsampling attention")
def _levit():
    cfg = dict(
        image_size=64,
        hidden_sizes=[32, 48, 64],
        num_attention_heads=[2, 3, 4],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
        patch_size=16,
        drop_path_rate=0,
        mlp_ratio=[2, 2, 2],
        attention_ratio=[2, 2, 2],
    )
    return _pixels(_hf("LevitConfig", "LevitModel", None, **cfg), size=64)


@spec("hiera", "vision", "mask-unit attention, query pooling")
def _hiera():
    cfg = dict(
        embed_dim=16,
        image_size=[32, 32],
        patch_size=[3, 3],
        patch_stride=[2, 2],
        patch_padding=[1, 1],
        depths=[1, 1],
        num_heads=[1, 2],
        query_stride=[2, 2],
        masked_unit_size=[4, 4],
        num_query_pool=1,
    )
    return _pixels(_hf("HieraConfig", "HieraModel", None, **cfg))


@spec("gpt-oss", "stress", "attention sinks, sliding + full, MoE (batched_mm)")
def _gpt_oss():
    cfg = dict(
        LLAMAISH,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        **MOE,
    )
    return _text(_hf("GptOssConfig", "GptOssModel", **cfg))


@spec("deepseek-v3", "stress", "multi-head latent attention, MoE (batched_mm)")
def _deepseek_v3():
    cfg = dict(
        LLAMAISH,
        moe_intermediate_size=16,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        **MOE,
    )
    cfg["num_key_value_heads"] = 4
    return _text(_hf("DeepseekV3Config", "DeepseekV3Model", **cfg))


@spec("qwen3-next", "stress", "gated DeltaNet linear attention + gated full attention, MoE (batched_mm)")
def _qwen3_next():
    cfg = dict(
        LLAMAISH,
        head_dim=8,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts_per_tok=2,
        num_experts=4,
        layer_types=["linear_attention", "full_attention"],
        **MOE,
    )
    return _text(_hf("Qwen3NextConfig", "Qwen3NextModel", **cfg))


@spec("minimax", "stress", "lightning (linear) attention + full attention, MoE (batched_mm)")
def _minimax():
    cfg = dict(
        LLAMAISH,
        head_dim=8,
        num_local_experts=2,
        num_experts_per_tok=1,
        block_size=4,
        layer_types=["linear_attention", "full_attention"],
        **MOE,
    )
    return _text(_hf("MiniMaxConfig", "MiniMaxModel", **cfg))


@spec("zamba2", "stress", "mamba2 + shared attention blocks")
def _zamba2():
    cfg = dict(
        LLAMAISH,
        layers_block_type=["mamba", "hybrid"],
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_ngroups=1,
        n_mamba_heads=4,
        chunk_size=8,
        use_mamba_kernels=False,
        num_mem_blocks=1,
        adapter_rank=4,
    )
    return _text(_hf("Zamba2Config", "Zamba2Model", **cfg))


@spec("falcon-h1", "stress", "parallel mamba2 + attention")
def _falcon_h1():
    cfg = dict(
        LLAMAISH,
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_n_groups=1,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=8,
    )
    return _text(_hf("FalconH1Config", "FalconH1Model", **cfg))


# --- torch.nn compositions
class _Encoder(nn.Module):
    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.enc(x, src_key_padding_mask=pad)


def _pad_mask(n: int = SEQ, k: int = 2) -> torch.Tensor:
    pad = torch.zeros(BATCH, n, dtype=torch.bool)
    pad[1, n - k :] = True
    return pad


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@spec("nn-transformer-encoder", "torch.nn", "batch_first, padding mask, post-norm")
def _nn_enc():
    torch.manual_seed(0)
    return _Encoder(False), (_x(BATCH, SEQ, 32), _pad_mask()), {}


@spec("nn-transformer-encoder-prenorm", "torch.nn", "norm_first")
def _nn_enc_pre():
    torch.manual_seed(0)
    return _Encoder(True), (_x(BATCH, SEQ, 32), _pad_mask()), {}


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.t(src, tgt, tgt_mask=causal, tgt_is_causal=True)


@spec("nn-transformer", "torch.nn", "encoder-decoder, causal tgt mask")
def _nn_transformer():
    torch.manual_seed(0)
    return _Transformer(), (_x(BATCH, SEQ, 32), _x(BATCH, 5, 32, seed=1)), {}


class _MHA(nn.Module):
    def __init__(self, cross: bool) -> None:
        super().__init__()
        self.cross = cross
        kw = dict(kdim=16, vdim=24) if cross else {}
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True, **kw)

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None, pad: torch.Tensor | None = None):
        if self.cross:
            return self.mha(x, mem[..., :16], mem, key_padding_mask=pad, need_weights=False)[0]
        return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]


@spec("nn-mha-self", "torch.nn", "key_padding_mask")
def _nn_mha():
    torch.manual_seed(0)
    return _MHA(False), (_x(BATCH, SEQ, 32),), {"pad": _pad_mask()}


@spec("nn-mha-cross-kdim-vdim", "torch.nn", "kdim 16, vdim 24, 6 keys")
def _nn_mha_cross():
    torch.manual_seed(0)
    return _MHA(True), (_x(BATCH, SEQ, 32), _x(BATCH, 6, 24, seed=1)), {"pad": _pad_mask(6, 1)}


@spec("nn-conv1d-stack", "torch.nn", "stride, dilation, groups, same, transposed")
def _nn_conv1d():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(8, 8, 5, stride=2, dilation=2, padding=4, groups=2),
        nn.GELU(),
        nn.Conv1d(8, 8, 3, padding="same", groups=8, padding_mode="reflect"),
        nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1),
    )
    return m, (_x(BATCH, 4, 32),), {}


@spec("nn-conv2d-stack", "torch.nn", "bn, depthwise, strided, transposed")
def _nn_conv2d():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        nn.Conv2d(8, 16, 1),
        nn.ConvTranspose2d(16, 4, 2, stride=2),
        nn.Conv2d(4, 4, (3, 5), padding=(1, 2), padding_mode="circular"),
    )
    return m, (_x(BATCH, 3, 16, 16),), {}


@spec("nn-conv3d-stack", "torch.nn", "3-d, strided, transposed")
def _nn_conv3d():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(4, 4, 3, stride=2, padding=1),
        nn.ConvTranspose3d(4, 2, 2, stride=2),
    )
    return m, (_x(BATCH, 2, 8, 8, 8),), {}


class _Recurrent(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        kw = dict(nonlinearity="relu") if kind == "RNN" else {}
        self.rnn = getattr(nn, kind)(16, 24, num_layers=2, batch_first=True, bidirectional=True, **kw)
        self.head = nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y)


for _kind in ("LSTM", "GRU", "RNN"):

    @spec(
        f"nn-{_kind.lower()}", "torch.nn", "2 layers, bidirectional, batch_first" + (", relu" if _kind == "RNN" else "")
    )
    def _nn_rnn(kind=_kind):
        torch.manual_seed(0)
        return _Recurrent(kind), (_x(BATCH, SEQ, 16),), {}


class _ConvLSTM(nn.Module):
    """A small speech-like model: conv front end, LSTM, self-attention pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 5, stride=2, padding=2)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).transpose(1, 2)
        h, _ = self.lstm(h)
        return self.attn(h, h, h, need_weights=False)[0]


@spec("nn-conv-lstm-mha", "torch.nn", "conv1d -> LSTM -> MHA")
def _nn_conv_lstm():
    torch.manual_seed(0)
    return _ConvLSTM(), (_x(BATCH, 8, 32),), {}


# --------------------------------------------------------------------------------------------- what the model has
_QKV_SETS = ({"q", "k", "v"}, {"query", "key", "value"})
_FUSED_QKV = {"qkv", "c_attn", "query_key_value", "wqkv", "qkv_proj", "att_proj", "w_pack"}
_SUFFIXES = ("_proj", "_lin", "_linear", "_head", "_dense", "_net", "proj", "_layer")


def _stem(name: str) -> str:
    n = name.lower()
    for s in _SUFFIXES:
        if n.endswith(s) and len(n) > len(s):
            return n[: -len(s)]
    return n


# Class names that mention attention but are its parts, not an attention (outputs, masks, norms, position tables).
_NOT_ATTENTION = (
    "Output",
    "Mask",
    "Norm",
    "Embedding",
    "Embeddings",
    "Bias",
    "Dropout",
    "Intermediate",
    "Gate",
    "Structure",
)


def _looks_like_attention(mod: nn.Module) -> bool:
    cls = type(mod).__name__
    if re.search(r"(Attention|Attn)", cls) and not cls.endswith(_NOT_ATTENTION):
        return True
    if "in_proj_weight" in dict(mod.named_parameters(recurse=False)):
        return True
    children = {n.lower() for n, _ in mod.named_children()}
    stems = {_stem(n) for n in children}
    if any(s <= stems for s in _QKV_SETS):
        return True
    return bool(children & _FUSED_QKV)


# Recurrences that no nn.RNNBase, Mamba mixer or WKV holds (RG-LRU, xLSTM cells, DeltaNet / linear attention, ...),
# by class name: "found" so that the survey shows them as not captured unless an ssm/gated/wkv transform covers them.
_RECURRENCE = re.compile(
    r"(?i)(rglru|lru$|lstm(cell|layer|block|backend)?$|deltanet|linearattention|lightningattention"
    r"|recurrence$|retention$)"
)


def _is_recurrence(mod: nn.Module) -> bool:
    return not isinstance(mod, nn.RNNBase) and bool(_RECURRENCE.search(type(mod).__name__))


def _is_wkv(mod: nn.Module) -> bool:
    own = dict(mod.named_parameters(recurse=False))
    return "time_decay" in own and "time_first" in own


def expected_layers(model: nn.Module) -> dict[str, list[str]]:
    """Module paths per family that a full capture would turn into transforms, from the model's modules alone."""
    mods = dict(model.named_modules())
    rec = [p for p, m in mods.items() if p and _is_recurrence(m)]
    rec = [p for p in rec if not any(q != p and q.startswith(p + ".") for q in rec)]
    att = [p for p, m in mods.items() if p and p not in rec and (_looks_like_attention(m) or _is_wkv(m))]
    # Innermost only: BertAttention holds BertSelfAttention, T5LayerSelfAttention holds T5Attention, ...
    inner = [p for p in att if not any(q != p and q.startswith(p + ".") for q in att)]
    # A linear-attention module named "...Attention" that holds a recurrence class counts once, as the recurrence.
    inner = [p for p in inner if not any(r == p or r.startswith(p + ".") or p.startswith(r + ".") for r in rec)]
    out: dict[str, list[str]] = {"dot_exp": [], "wkv": [], "stationary": [], "gated": [], "ssm": [], "recurrence": rec}
    for p in inner:
        out["wkv" if _is_wkv(mods[p]) else "dot_exp"].append(p)
    for p, m in mods.items():
        if isinstance(m, nn.modules.conv._ConvNd):
            out["stationary"].append(p)
        elif isinstance(m, nn.RNNBase):
            out["gated"].append(p)
        elif "A_log" in dict(m.named_parameters(recurse=False)) and p not in rec:
            out["ssm"].append(p)
    # A WKV mixer found by its parameters is not also an attention module.
    return out


def _match(expected: dict[str, list[str]], transforms: list[object]) -> tuple[dict[str, list[str]], list[str]]:
    """Expected paths left without a transform of their family, and transforms that match no expected path.

    A transform matches a path when its layer is the path or below it; one transform per path."""
    pool: dict[str, list[str]] = {}
    for t in transforms:
        pool.setdefault(t.family, []).append(t.layer or "")
    missing: dict[str, list[str]] = {}
    for fam, paths in expected.items():
        # "recurrence" (found by class name) is covered by a scan of any recurrent family, taken from what is left.
        fams = ("ssm", "gated", "wkv") if fam == "recurrence" else (fam,)
        for p in paths:
            avail = next(
                (
                    pool[f]
                    for f in fams
                    if any(
                        lay == p or lay.startswith(p + ".") or (lay and p.startswith(lay + "."))
                        for lay in pool.get(f, [])
                    )
                ),
                pool.get(fams[0], []),
            )
            hit = next((i for i, lay in enumerate(avail) if lay == p or lay.startswith(p + ".")), None)
            if hit is None:  # attributed to an enclosing module (a functional call in the parent's forward)
                hit = next((i for i, lay in enumerate(avail) if lay and p.startswith(lay + ".")), None)
            if hit is None:
                missing.setdefault(fam, []).append(p)
            else:
                avail.pop(hit)
    extra = [f"{fam}@{lay}" for fam, lays in pool.items() for lay in lays]
    return missing, extra


def _layer_ops(prog: object, path: str, limit: int = 40) -> list[str]:
    """The generic ops the program kept for module ``path`` (and below), as ``op: type``, in program order; when
    the layer holds a softmax, the ops around the first one (where an attention pattern broke)."""
    rows = []
    for n in prog.nodes:
        lay = n.layer or ""
        if n.is_transform or not (lay == path or lay.startswith(path + ".")):
            continue
        op = n.op.replace("aten.", "").replace(".default", "")
        ty = ",".join(str(o.type) for o in n.outputs) if n.outputs else ""
        rows.append(f"{op}: {ty}")
    soft = next((i for i, r in enumerate(rows) if r.startswith(("softmax", "_softmax"))), None)
    if soft is not None:
        lo = max(0, soft - 16)
        cut = rows[lo : soft + 8]
        return (
            ([f"... {lo} ops before"] if lo else [])
            + cut
            + ([f"... {len(rows) - soft - 8} ops after"] if len(rows) > soft + 8 else [])
        )
    if len(rows) > limit:
        rows = rows[:limit] + [f"... {len(rows) - limit} more"]
    return rows


# ------------------------------------------------------------------------------------------------------ comparing
def _float_leaves(out: object) -> list[torch.Tensor]:
    from torch.utils import _pytree

    if hasattr(out, "to_tuple"):  # transformers ModelOutput: its non-None fields, in order
        out = out.to_tuple()
    leaves, _ = _pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        same = torch.equal(torch.nan_to_num(a, 0.0, 1e300, -1e300), torch.nan_to_num(b, 0.0, 1e300, -1e300))
        return 0.0 if same else float("nan")
    den = a.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def _frame(f: traceback.FrameSummary | None, code: bool = False) -> str:
    if f is None:
        return ""
    fn = f.filename
    if "site-packages/" in fn:
        fn = fn.split("site-packages/", 1)[1]
    elif str(ROOT) in fn:
        fn = os.path.relpath(fn, ROOT)
    text = f"{fn}:{f.lineno} {f.name}"
    if code and f.line:
        text += f" | {f.line.strip()}"
    return text


def _where(e: BaseException) -> str:
    """The innermost traceback frame inside itnet_compiler (else the innermost frame), as ``file:line fn``."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "itnet_compiler" in f.filename]
    return _frame((ours or frames or [None])[-1])


def _model_where(e: BaseException) -> str:
    """The innermost frame of model code (transformers or this file) in the chain of causes: the line of the model
    that torch.export (or itnet) could not take, with its source."""
    seen, chain = set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for exc in reversed(chain):  # the root cause first
        frames = [
            f
            for f in traceback.extract_tb(exc.__traceback__)
            if ("transformers/" in f.filename and "transformers/utils/" not in f.filename)
            or (f.filename == __file__ and f.name == "forward")
        ]
        if frames:
            return _frame(frames[-1], code=True)
    return ""


# --------------------------------------------------------------------------------------------------------- survey
@dataclass
class Record:
    name: str
    group: str
    note: str = ""
    status: str = "ok"  # ok | construct-failed | convert-failed | build-failed | run-failed
    error: str = ""
    where: str = ""
    model_where: str = ""
    support_issues: list[str] = field(default_factory=list)
    model_class: str = ""
    attn_impl: str | None = None
    families: dict[str, int] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    missing_ops: dict[str, list[str]] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    transforms: list[dict[str, object]] = field(default_factory=list)
    generic_ops: int = 0
    err_first: float | None = None
    err_max: float | None = None
    n_outputs: int = 0
    fallbacks: dict[str, str] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    expect_support: str | None = None

    @property
    def converted(self) -> bool:
        return self.status in ("ok", "build-failed", "run-failed")

    @property
    def full(self) -> bool:
        return self.converted and not any(self.missing.values())


def _attrs_summary(node: object) -> dict[str, object]:
    a = node.attrs
    keep = ("heads", "kv_heads", "scale", "support", "mask", "score_mod", "normalize", "rank", "stride", "groups")
    d: dict[str, object] = {"layer": node.layer, "family": node.family}
    for k in keep:
        if hasattr(a, k):
            v = getattr(a, k)
            d[k] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
    return d


def survey_one(sp: Spec, backend: str) -> Record:
    import itnet_compiler as itc

    rec = Record(sp.name, sp.group, sp.note)
    rec.expect_support = sp.expect_support
    t0 = time.perf_counter()
    try:
        model, args, kwargs = sp.make()
        model.train(False)
    except Exception as e:  # noqa: BLE001  (a survey: record and go on)
        rec.status, rec.error, rec.where = "construct-failed", _first_line(e), _where(e)
        rec.times["construct"] = time.perf_counter() - t0
        return rec
    rec.times["construct"] = time.perf_counter() - t0
    rec.model_class = type(model).__name__
    cfg = getattr(model, "config", None)
    rec.attn_impl = getattr(cfg, "_attn_implementation", None) if cfg is not None else None
    exp = expected_layers(model)
    rec.expected = {k: len(v) for k, v in exp.items() if v}

    # Eager reference first (and with autograd on, as export sees it: nn.TransformerEncoderLayer's no-grad fast path
    # is then off on both sides).
    t = time.perf_counter()
    try:
        ref = model(*args, **kwargs)
        ref_leaves = [x.detach() for x in _float_leaves(ref)]
    except Exception as e:  # noqa: BLE001
        rec.status, rec.error, rec.where = "construct-failed", "eager forward: " + _first_line(e), _where(e)
        return rec
    rec.times["eager"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        # torch prints the whole traced graph to stderr on some export failures; the error line says enough
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            prog = itc.convert(model, args, kwargs)
    except Exception as e:  # noqa: BLE001
        rec.times["convert"] = time.perf_counter() - t
        rec.status, rec.error, rec.where = "convert-failed", _first_line(e), _where(e)
        rec.model_where = _model_where(e)
        rec.missing = {k: list(v) for k, v in exp.items() if v}
        return rec
    rec.times["convert"] = time.perf_counter() - t
    trs = prog.transforms
    rec.families = dict(Counter(n.family for n in trs))
    rec.transforms = [_attrs_summary(n) for n in trs]
    rec.generic_ops = len(prog.nodes) - len(trs)
    rec.missing, rec.extra = _match(exp, trs)
    if sp.expect_support == "causal":
        rec.support_issues = [
            f"{n.layer}: support={n.attrs.support} mask={n.attrs.mask}"
            for n in trs
            if n.family == "dot_exp" and str(n.attrs.support) == "full"
        ]
    for paths in rec.missing.values():
        for p in paths:
            rec.missing_ops[p] = _layer_ops(prog, p)

    t = time.perf_counter()
    try:
        mod = itc.build(prog, backend=backend)
    except Exception as e:  # noqa: BLE001
        rec.times["build"] = time.perf_counter() - t
        rec.status, rec.error, rec.where = "build-failed", _first_line(e), _where(e)
        return rec
    rec.times["build"] = time.perf_counter() - t
    rec.fallbacks = dict(getattr(mod, "fallbacks", {}) or {})

    t = time.perf_counter()
    try:
        with torch.no_grad():
            got = mod(*args, **kwargs)
        got_leaves = _float_leaves(got)
    except Exception as e:  # noqa: BLE001
        rec.times["run"] = time.perf_counter() - t
        rec.status, rec.error, rec.where = "run-failed", _first_line(e), _where(e)
        return rec
    rec.times["run"] = time.perf_counter() - t
    rec.fallbacks = dict(getattr(mod, "fallbacks", {}) or {})
    rec.n_outputs = len(ref_leaves)
    if ref_leaves and got_leaves:
        errs = [_rel(a, b) for a, b in zip(ref_leaves, got_leaves, strict=False)]
        if len(got_leaves) != len(ref_leaves):
            errs.append(float("inf"))
            rec.error = f"output count differs: eager {len(ref_leaves)} floating outputs, built {len(got_leaves)}"
        rec.err_first = errs[0]
        rec.err_max = max(errs, key=lambda x: float("inf") if x != x else x)
    elif ref_leaves:
        rec.err_first = rec.err_max = float("inf")
        rec.error = "built module returned no floating output"
    return rec


# -------------------------------------------------------------------------------------------------------- output
_ORDER = ("dot_exp", "wkv", "stationary", "gated", "ssm", "recurrence")
_SHORT = {"dot_exp": "attn", "stationary": "conv", "gated": "rnn", "ssm": "ssm", "wkv": "wkv", "recurrence": "rec"}
TOL = 1e-4


def _fam_text(counts: dict[str, int]) -> str:
    """Transforms per family, as captured: ``dot_exp 2, stationary 1``."""
    fams = [f for f in _ORDER if counts.get(f)] + sorted(f for f in counts if f not in _ORDER)
    return ", ".join(f"{f} {counts[f]}" for f in fams) or "-"


def _cov_text(r: Record) -> str:
    """Per kind of module found in the model: how many have a transform of their family (``attn 2/2``); ``+N``
    counts transforms that came from no found module (a shared module called twice, a functional conv, ...)."""
    parts = []
    for fam in _ORDER:
        found = r.expected.get(fam, 0)
        if found:
            parts.append(f"{_SHORT[fam]} {found - len(r.missing.get(fam, []))}/{found}")
    if r.converted and r.extra:
        parts.append(f"+{len(r.extra)}")
    return ", ".join(parts) or "-"


def _support_text(r: Record) -> str:
    """The dot_exp nodes' supports: ``causal 2``, ``full+mask 2`` (a mask input), ``+mod`` (a score expression)."""
    c: Counter[str] = Counter()
    for t in r.transforms:
        if t["family"] != "dot_exp":
            continue
        label = str(t.get("support"))
        if t.get("mask") not in (None, "none"):
            label += "+mask"
        if t.get("score_mod"):
            label += "+mod"
        c[label] += 1
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"


def _fmt_err(x: float | None) -> str:
    if x is None:
        return "-"
    if x != x:
        return "nan"
    if x == float("inf"):
        return "inf"
    return f"{x:.1e}"


def _ok_err(r: Record) -> bool:
    return r.err_max is not None and r.err_max <= TOL


def _note(r: Record) -> str:
    if r.error:
        return r.error
    if r.converted and r.status == "ok" and not _ok_err(r):
        return f"mismatch vs eager (first floating output {_fmt_err(r.err_first)})"
    notes = []
    if r.support_issues:
        notes.append(f"causal not recovered in {len(r.support_issues)} ({r.support_issues[0]})")
    if r.fallbacks:
        notes.append(
            f"{len(r.fallbacks)} fallbacks: " + "; ".join(f"{k}: {v}" for k, v in list(r.fallbacks.items())[:2])
        )
    return "; ".join(notes)


_STATUS = {
    "ok": "yes",
    "convert-failed": "NO",
    "construct-failed": "skip",
    "build-failed": "build!",
    "run-failed": "run!",
}


def print_table(recs: list[Record], width: int = 150) -> None:
    head = (
        "model",
        "conv?",
        "families captured",
        "captured/found",
        "attn mods",
        "dot_exp supports",
        "max rel err",
        "conv s",
        "total s",
        "first error / note",
    )
    rows = []
    for r in recs:
        status = _STATUS[r.status] + (" (partial)" if r.converted and not r.full else "")
        rows.append(
            (
                r.name,
                status,
                _fam_text(r.families) if r.converted else "-",
                _cov_text(r),
                str(r.expected.get("dot_exp", 0)),
                _support_text(r),
                _fmt_err(r.err_max),
                f"{r.times.get('convert', 0):.1f}",
                f"{sum(r.times.values()):.1f}",
                _note(r)[:width],
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    line = " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_summary(recs: list[Record], wall: float) -> dict[str, object]:
    built = [r for r in recs if r.status != "construct-failed"]
    conv = [r for r in built if r.converted]
    full = [r for r in conv if r.full]
    ran = [r for r in conv if r.status == "ok"]
    exact = [r for r in ran if _ok_err(r)]
    exp_att = sum(r.expected.get("dot_exp", 0) for r in conv)
    got_att = exp_att - sum(len(r.missing.get("dot_exp", [])) for r in conv)
    summary = {
        "models": len(recs),
        "constructed": len(built),
        "converted": len(conv),
        "fully_captured": len(full),
        "ran": len(ran),
        "match_eager": len(exact),
        "tolerance": TOL,
        "attention_modules_in_converted": exp_att,
        "attention_modules_captured": got_att,
        "wall_s": round(wall, 1),
        "skipped": {r.name: r.error for r in recs if r.status == "construct-failed"},
        "convert_failed": [r.name for r in recs if r.status == "convert-failed"],
        "partial": [r.name for r in conv if not r.full],
        "mismatch": [r.name for r in ran if not _ok_err(r)],
        "causal_not_recovered": [r.name for r in conv if r.support_issues],
        "with_fallbacks": [r.name for r in conv if r.fallbacks],
        "build_or_run_failed": [r.name for r in recs if r.status in ("build-failed", "run-failed")],
    }
    print()
    print(
        f"{len(recs)} models: {len(built)} constructed, {len(conv)} converted, {len(full)} fully captured, "
        f"{len(ran)} ran, {len(exact)} match eager (max rel err <= {TOL:g}); attention modules captured "
        f"{got_att}/{exp_att} in the converted models; {wall:.0f} s"
    )
    for key in (
        "convert_failed",
        "partial",
        "mismatch",
        "causal_not_recovered",
        "with_fallbacks",
        "build_or_run_failed",
    ):
        if summary[key]:
            print(f"{key.replace('_', ' ')} ({len(summary[key])}): {', '.join(summary[key])}")
    if summary["skipped"]:
        print("skipped (did not construct offline, or eager forward failed):")
        for k, v in summary["skipped"].items():
            print(f"  {k}: {v}")
    return summary


def print_explain(recs: list[Record]) -> None:
    for r in recs:
        bad = r.missing or r.error or r.support_issues or r.fallbacks or (r.status == "ok" and not _ok_err(r))
        if not bad:
            continue
        print(f"\n== {r.name} ({r.model_class}, attn_implementation={r.attn_impl}) status={r.status}")
        if r.error:
            print(f"   error: {r.error}")
            if r.where:
                print(f"   itnet frame: {r.where}")
            if r.model_where:
                print(f"   model frame: {r.model_where}")
        if r.status == "ok" and not _ok_err(r):
            print(f"   max rel err {_fmt_err(r.err_max)} (first floating output {_fmt_err(r.err_first)})")
        for fam, paths in r.missing.items():
            print(f"   missing {fam}: {', '.join(paths)}")
        shown = 0
        for p, ops in r.missing_ops.items():
            if shown >= 1:  # the layers of a model repeat; one is enough
                print(f"   ... ({len(r.missing_ops) - shown} more missing layers)")
                break
            print(f"   generic ops kept in {p}:")
            for o in ops:
                print(f"     {o}")
            shown += 1
        for issue in r.support_issues:
            print(f"   causal expected, got {issue}")
        if r.extra and (r.missing or r.error):
            print(f"   transforms on no found module: {', '.join(r.extra[:8])}")
        for k, v in r.fallbacks.items():
            print(f"   fallback {k}: {v}")


def _selected(names: str, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pat.strip()) for pat in names.split(",") if pat.strip())


def main(args: argparse.Namespace) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    specs = [s for s in SPECS if (not args.only or _selected(args.only, s.name))]
    specs = [s for s in specs if not (args.skip and _selected(args.skip, s.name))]
    if args.list:
        for s in SPECS:
            print(f"{s.name:32s} {s.group:10s} {s.note}")
        return 0
    if not specs:
        print(f"no model matches --only {args.only!r}; --list shows the names", file=sys.stderr)
        return 2
    print(
        f"backend={args.backend} torch={torch.__version__} threads={torch.get_num_threads()} models={len(specs)}"
        + (" TRITON_INTERPRET=1" if os.environ.get("TRITON_INTERPRET") == "1" else ""),
        flush=True,
    )
    recs = []
    t0 = time.perf_counter()
    for sp in specs:
        rec = survey_one(sp, args.backend)
        recs.append(rec)
        tot = sum(rec.times.values())
        print(
            f"  {rec.name:30s} {rec.status:16s} {_cov_text(rec):34s} "
            f"err {_fmt_err(rec.err_max):8s} {tot:6.1f}s {rec.error[:100]}",
            flush=True,
        )
    wall = time.perf_counter() - t0
    print()
    print_table(recs)
    summary = print_summary(recs, wall)
    if args.explain:
        print_explain(recs)
    if args.json:
        from dataclasses import asdict

        payload = {
            "backend": args.backend,
            "torch": torch.__version__,
            "transformers": getattr(sys.modules.get("transformers"), "__version__", None),
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "seq": SEQ,
            "summary": summary,
            "models": [asdict(r) | {"converted": r.converted, "fully_captured": r.full} for r in recs],
        }

        def _clean(o: object) -> object:
            if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
                return str(o)
            if isinstance(o, dict):
                return {k: _clean(v) for k, v in o.items()}
            if isinstance(o, list):
                return [_clean(v) for v in o]
            return o

        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_clean(payload), indent=1) + "\n")
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(ARGS))
