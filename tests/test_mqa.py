"""Multi-query attention written as SDPA over a key/value head dimension of 1 (SDPA broadcasts it; Falcon's
multi_query models do this) is captured as GQA with kv_heads=1, and runs on the torch and Triton backends (under
the interpreter, no fallback) as eager does."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

import itnet_compiler as itc  # noqa: E402


class Broadcast(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    assert (a - b).abs().max() <= tol * b.abs().max()


def test_head_dim_one_is_gqa_with_one_kv_head() -> None:
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 1, 8, 16), torch.randn(2, 1, 8, 16)
    prog = itc.convert(Broadcast(), (q, k, v))
    [node] = prog.transforms
    assert (node.family, node.attrs.heads, node.attrs.kv_heads, node.attrs.support) == ("dot_exp", 4, 1, "causal")
    want = Broadcast()(q, k, v)
    _close(itc.build(prog)(q, k, v), want)
    tri = itc.build(prog, backend="triton")
    assert not tri.fallbacks
    _close(tri(q, k, v), want, 1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_falcon_multi_query_attention_is_captured(backend) -> None:
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    multi_query=True, new_decoder_architecture=False, use_cache=False,
                                    attn_implementation="sdpa")  # fmt: skip
    model = transformers.FalconModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    prog = itc.convert(model, (ids,))
    attn = [n for n in prog.transforms if n.family == "dot_exp"]
    assert len(attn) == cfg.num_hidden_layers and all((n.attrs.heads, n.attrs.kv_heads) == (4, 1) for n in attn)
    built = itc.build(prog, backend=backend)
    assert not getattr(built, "fallbacks", {})
    with torch.no_grad():
        want = model(ids).last_hidden_state
    _close(built(ids).last_hidden_state, want, 1e-4 if backend == "triton" else 1e-5)
