"""Attention workloads for the approximate lowerings: q, k, v that look like a real model's, and one that does not.

- ``random_peaked``: every row's mass sits on one key at a random earlier position (a permutation of the past), with
  nothing else in common between rows: no block structure, the worst case for any selection or sampling scheme.
- ``structured``: what trained decoders show (StreamingLLM's sinks, rotary local bands, retrieval heads): per head a
  mix of a local band from rotary positions (q_i·k_j ~ Σ_f cos(ω_f (i - j))), attention sinks (the first keys carry a
  direction every query shares) and long-range matches between content clusters (tokens of one of C clusters share
  a centroid in q and k), plus isotropic noise; logit scale chosen so that the mean row entropy is about 2.7 nats.
- ``trained``: q, k, v of a small rotary transformer that ``bench/train_tiny_lm.py`` trains on the CPU on the Python
  standard library's source files, captured at its trained length or beyond it (weights in
  ``bench/results/tiny_lm.safetensors``).

Each maker returns float32 (q, k, v) of shape [1, H, N, D], deterministic for a seed. ``row_entropy`` measures a
workload (mean nats over rows, from a sample of rows).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TINY_LM = RESULTS / "tiny_lm.safetensors"
WORKLOADS = ("random_peaked", "structured", "trained")


def random_peaked(n: int, heads: int = 4, d: int = 64, seed: int = 0, sharpness: float = 4.0):
    """Row i's query is a scaled copy of the key at a random position π(i) ≤ i, plus noise."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, heads, n, d, generator=g) / math.sqrt(d) * math.sqrt(d)
    pick = (torch.rand(1, heads, n, generator=g) * (torch.arange(n) + 1)).long()
    q = sharpness * torch.gather(k, 2, pick[..., None].expand(-1, -1, -1, d)) / math.sqrt(d) ** 0.5
    q = q + 0.3 * torch.randn(1, heads, n, d, generator=g)
    v = torch.randn(1, heads, n, d, generator=g)
    return q, k, v


def structured(n: int, heads: int = 4, d: int = 64, seed: int = 0, clusters: int = 32, sinks: int = 4):
    """Local rotary band, sinks and clustered long-range retrieval, mixed differently per head."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(n, dtype=torch.float64)
    # [local band dims | sink dim | cluster dims | noise dims]
    nf = 8  # rotary frequency pairs: 16 dims
    dc = 16
    dn = d - 2 * nf - 1 - dc
    assert dn > 0, "head dim too small for the structured workload"
    freqs = 1.0 / (8.0 * 1.6 ** torch.arange(nf, dtype=torch.float64))  # bands of a few to ~100 positions
    ang = pos[:, None] * freqs[None, :]
    rot = torch.cat([ang.cos(), ang.sin()], -1)  # [n, 2nf]: rot_i · rot_j = Σ cos(ω (i - j))
    # clusters: contiguous segments of random length, each assigned one of `clusters` topics (topics recur)
    seg_len = torch.randint(16, 256, (n // 16 + 1,), generator=g)
    seg_topic = torch.randint(0, clusters, (len(seg_len),), generator=g)
    topic = torch.repeat_interleave(seg_topic, seg_len)[:n]
    centroids = torch.randn(clusters, dc, generator=g, dtype=torch.float64)
    centroids = centroids / centroids.norm(dim=-1, keepdim=True)
    mix = [(1.0, 0.4, 0.3), (0.8, 1.0, 0.2), (0.4, 0.3, 1.0), (0.7, 0.6, 0.7)]  # (local, sink, cluster) per head
    qs, ks = [], []
    for h in range(heads):
        a_loc, a_sink, a_clu = mix[h % len(mix)]
        noise_q = torch.randn(n, dn, generator=g, dtype=torch.float64)
        noise_k = torch.randn(n, dn, generator=g, dtype=torch.float64)
        sink_k = torch.zeros(n, 1, dtype=torch.float64)
        sink_k[:sinks] = 1.0
        qh = torch.cat(
            [
                math.sqrt(a_loc) * rot,
                torch.full((n, 1), math.sqrt(a_sink) * 3.0, dtype=torch.float64),
                math.sqrt(a_clu) * 2.0 * centroids[topic] + 0.3 * torch.randn(n, dc, generator=g, dtype=torch.float64),
                0.35 * noise_q,
            ],
            -1,
        )
        kh = torch.cat(
            [
                math.sqrt(a_loc) * rot,
                math.sqrt(a_sink) * 3.0 * sink_k,
                math.sqrt(a_clu) * 2.0 * centroids[topic] + 0.3 * torch.randn(n, dc, generator=g, dtype=torch.float64),
                0.35 * noise_k,
            ],
            -1,
        )
        qs.append(qh)
        ks.append(kh)
    scale = 1.25 * math.sqrt(d)  # with the layer scale 1/√d: mean row entropy ≈ 2.9 nats at N 4k, 3.7 at 16k
    q = (torch.stack(qs)[None] * scale).float()
    k = torch.stack(ks)[None].float()
    v = torch.randn(1, heads, n, d, generator=g)
    return q, k, v


def trained(n: int, seed: int = 0, layer: int = -1, weights: Path = TINY_LM):
    """q, k, v (after rotary) of one layer of the trained tiny LM on n characters of standard-library source."""
    from train_tiny_lm import capture  # noqa: PLC0415 (bench-local module)

    return capture(n, seed=seed, layer=layer, weights=weights)


def make(name: str, n: int, seed: int = 0):
    if name == "random_peaked":
        return random_peaked(n, seed=seed)
    if name == "structured":
        return structured(n, seed=seed)
    if name == "trained":
        return trained(n, seed=seed)
    raise ValueError(f"unknown workload {name!r}; workloads are: {', '.join(WORKLOADS)}")


def row_entropy(q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, rows: int = 256) -> float:
    """Mean entropy (nats) of softmax(q kᵀ/√d) over a strided sample of rows."""
    n, d = q.shape[-2], q.shape[-1]
    idx = torch.linspace(0, n - 1, min(rows, n)).long()
    s = (q[..., idx, :].double() @ k.double().transpose(-2, -1)) / math.sqrt(d)
    if causal:
        s = s.masked_fill(torch.arange(n)[None, :] > idx[:, None], float("-inf"))
    p = torch.softmax(s, -1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return float(ent.mean())


class StructuredDecoder(torch.nn.Module):
    """A decoder whose attention is the ``structured`` workload's: its input embeddings carry, per token, every
    head's query and key features of ``structured(n)`` side by side ([B, N, 2·H·D]); each block's q and k
    projections read them (identity maps at init), v and the output projection are random, and a pre-norm GELU
    MLP follows, both on a residual stream. Small output weights keep the stream's structure through the blocks,
    as trained models keep their positional and content directions."""

    def __init__(self, layers: int = 2, heads: int = 4, d: int = 64, hidden: int = 1024, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.heads, self.d = heads, d
        width = 2 * heads * d
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            b = torch.nn.Module()
            b.q = torch.nn.Linear(width, heads * d, bias=False)
            b.k = torch.nn.Linear(width, heads * d, bias=False)
            b.v = torch.nn.Linear(width, heads * d, bias=False)
            b.o = torch.nn.Linear(heads * d, width, bias=False)
            b.norm = torch.nn.LayerNorm(width)
            b.up = torch.nn.Linear(width, hidden)
            b.down = torch.nn.Linear(hidden, width)
            with torch.no_grad():
                eye = torch.eye(heads * d)
                b.q.weight.copy_(torch.cat([eye, torch.zeros_like(eye)], 1))
                b.k.weight.copy_(torch.cat([torch.zeros_like(eye), eye], 1))
                for lin, std in ((b.v, 0.01), (b.o, 0.02), (b.up, 0.05), (b.down, 0.01)):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
            self.blocks.append(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, n, _ = x.shape
        for b in self.blocks:
            split = lambda t: t.view(bsz, n, self.heads, self.d).transpose(1, 2)  # noqa: E731
            a = torch.nn.functional.scaled_dot_product_attention(split(b.q(x)), split(b.k(x)), split(b.v(x)),
                                                                 is_causal=True)  # fmt: skip
            x = x + b.o(a.transpose(1, 2).reshape(bsz, n, self.heads * self.d))
            x = x + b.down(torch.nn.functional.gelu(b.up(b.norm(x))))
        return x


def structured_embeddings(n: int, heads: int = 4, d: int = 64, seed: int = 0) -> torch.Tensor:
    """``StructuredDecoder``'s input for ``structured(n, heads, d, seed)``: [1, N, 2·H·D]."""
    q, k, _ = structured(n, heads, d, seed)
    return torch.cat([q[0].transpose(0, 1).reshape(n, -1), k[0].transpose(0, 1).reshape(n, -1)], -1)[None]


def structured_decoder(layers: int = 2) -> StructuredDecoder:
    """Factory for ``itnet convert bench/attention_workloads.py:structured_decoder``."""
    return StructuredDecoder(layers).eval()
