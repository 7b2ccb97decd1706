"""A small rotary transformer language model trained on the CPU on the Python standard library's own source files:
the ``trained`` attention workload (``bench/attention_workloads.py``) is its q, k, v.

    .venv/bin/python bench/train_tiny_lm.py            # ≈ 8 min on 2 cores; writes bench/results/tiny_lm.safetensors

Byte-level (vocabulary 256), 2 layers, 3 heads of dim 64, rotary positions (so it runs past its trained length),
trained at length 256. ``capture(n)`` returns (q, k, v) after rotary of one layer on n bytes of standard-library
source the model was not trained on (a different file order, seeded), computed with the exact fused torch lowering
(O(N) memory, so n reaches 32k).
"""

from __future__ import annotations

import argparse
import math
import random
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHTS = RESULTS / "tiny_lm.safetensors"
CONFIG = {"d_model": 192, "heads": 3, "layers": 2, "ffn": 512, "base": 10000.0}


def corpus(seed: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of the standard library's .py files, concatenated in a seeded order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    random.Random(seed).shuffle(files)
    out = bytearray()
    for f in files:
        out += f.read_bytes()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """x [B, H, L, D] rotated by position (pairs (i, i + D/2))."""
    n, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d // 2, dtype=torch.float64) / (d // 2)))
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


class Block(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d = c["d_model"]
        self.heads, self.base = c["heads"], c["base"]
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, c["ffn"]), nn.GELU(), nn.Linear(c["ffn"], d))

    def qkv_heads(self, x: torch.Tensor):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return rotary(q, self.base), rotary(k, self.base), v

    def forward(self, x: torch.Tensor, attend=None) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        if attend is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = attend(q, k, v)
        b, _, n, _ = y.shape
        x = x + self.out(y.transpose(1, 2).reshape(b, n, -1))
        return x + self.ff(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, c: dict = CONFIG):
        super().__init__()
        self.emb = nn.Embedding(256, c["d_model"])
        self.blocks = nn.ModuleList(Block(c) for _ in range(c["layers"]))
        self.ln = nn.LayerNorm(c["d_model"])
        self.head = nn.Linear(c["d_model"], 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def train(minutes: float, length: int = 256, batch: int = 16, seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    data = torch.frombuffer(bytearray(corpus(seed, 8 << 20)), dtype=torch.uint8).long()
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    start, step = time.time(), 0
    while time.time() - start < minutes * 60:
        ix = torch.randint(0, len(data) - length - 1, (batch,))
        x = torch.stack([data[i : i + length] for i in ix])
        y = torch.stack([data[i + 1 : i + length + 1] for i in ix])
        loss = F.cross_entropy(model(x).view(-1, 256), y.view(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            bits = loss.item() / math.log(2)
            print(f"step {step}  {time.time() - start:5.0f} s  loss {loss.item():.3f} ({bits:.2f} bits/byte)")
    return model


def load(weights: Path = WEIGHTS) -> TinyLM:
    from safetensors.torch import load_file

    model = TinyLM()
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


@torch.no_grad()
def capture(n: int, seed: int = 0, layer: int = -1, weights: Path = WEIGHTS):
    """(q, k, v) [1, 3, n, 64] of ``layer`` on n bytes of held-out source (seed picks the file order)."""
    from itnet_compiler.backends.torch.attention import attention_fused

    model = load(weights)
    text = corpus(1000 + seed, n)
    idx = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()[None]
    layer = layer % len(model.blocks)

    def fused(q, k, v):
        return attention_fused(q, k, v, scale=1 / math.sqrt(q.shape[-1]), causal=True, return_weights=False)

    x = model.emb(idx)
    for i, blk in enumerate(model.blocks):
        if i == layer:
            return blk.qkv_heads(x)
        x = blk(x, attend=fused)
    raise AssertionError("unreachable")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("-o", "--out", type=Path, default=WEIGHTS)
    args = ap.parse_args()
    from safetensors.torch import save_file

    model = train(args.minutes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
