"""A small ITNet classifier on scikit-learn's 8×8 digits, against a CNN and a transformer of about equal size.

    python bench/itnet_classifier.py [--epochs N] [--threads 2] [--only itnet-grid,itnet-points,...]

Data: ``sklearn.datasets.load_digits`` (1797 images, 8×8, values 0–16, scaled to [0, 1]), one stratified 80/20
split with a fixed seed (1437 train, 360 test), no augmentation. Every model trains with the same budget: AdamW
(peak lr 3e-3, weight decay 1e-2), one-cycle schedule (10 % warm-up, cosine decay) over ``--epochs`` epochs
(default 30) of batches of 64, the same seed.

Models (parameter counts within ±20 % of each other; the table prints them):

* ``itnet-grid``: each pixel value → a linear embedding (Linear(1, 32)) and nothing else — no positional embedding,
  the layer makes its own (row, column) coordinates (``domain="grid"``); two pre-norm residual blocks of
  ``IntegralTransform(32, heads=4, hidden=16, domain="grid", lowering="dense")`` + an MLP (32 → 96 → 32); mean
  pool, LayerNorm, Linear.
* ``itnet-points``: the same network on the 64 pixels as a point set (``domain="points"``, ``coord_dim=2``,
  coordinates (row, column) passed in), the points shuffled in a fresh random order in every batch (the model never
  sees a raster order). Same coordinates, same function as ``itnet-grid``: the layer is permutation-equivariant and
  the pool invariant, so the two train alike up to rounding.
* ``itnet-sparse``: only the non-zero pixels as points (16 to 42 per image), padded to 42; the padding mask goes to
  the layer (``forward(u, coords, mask=keep)``), so the padding points are outside every softmax, and the
  classifier's mean pool skips them too. The positions of the zero pixels are not given to the model.
* ``cnn``: Conv(1→16, 3×3) → Conv(16→32, 3×3) → max-pool 2 → Conv(32→64, 3×3) → global average pool → Linear(64, 10),
  ReLU between.
* ``transformer``: Linear(1, 32) pixel embedding + learned positional embedding (64 × 32), two
  ``nn.TransformerEncoderLayer(32, 4, dim_feedforward=96, pre-norm, GELU)``, mean pool, LayerNorm, Linear.

Writes ``bench/results/itnet_classifier.json`` and ``docs/itnet_classifier_curves.png`` (test accuracy and training
loss per epoch); with ``--epochs N`` other than 30, ``itnet_classifier.eN.json`` and ``itnet_classifier_eN_curves.png``.
An ``--only`` run replaces the rows of the models it ran and keeps the others (each row records its threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import RESULTS, ROOT, write_result  # noqa: E402
from torch import nn  # noqa: E402

from itnet_compiler.nn import IntegralTransform  # noqa: E402

DOCS = ROOT / "docs"
DIM = 32
PAD = 42  # the most non-zero pixels of any digits image


def load(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 8, 8) / 16.0
    y = torch.tensor(y)
    tr, te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed, stratify=y.numpy())
    return x[tr], y[tr], x[te], y[te]


class Block(nn.Module):
    """Pre-norm residual: u + IT(LN u), then u + MLP(LN u)."""

    def __init__(self, mixer: nn.Module, dim: int, ff: int):
        super().__init__()
        self.n1, self.n2, self.mixer = nn.LayerNorm(dim), nn.LayerNorm(dim), mixer
        self.mlp = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))

    def forward(self, u, coords=None, mask=None):
        h = self.n1(u)
        u = u + (self.mixer(h) if coords is None else self.mixer(h, coords, mask=mask))
        return u + self.mlp(self.n2(u))


class ITNetClassifier(nn.Module):
    def __init__(self, domain: str, dim: int = DIM, depth: int = 2, heads: int = 4, hidden: int = 16, ff: int = 96,
                 sparse: bool = False):  # fmt: skip
        super().__init__()
        self.domain, self.sparse = domain, sparse
        self.embed = nn.Linear(1, dim)
        kw = dict(coord_dim=2) if domain == "points" else {}
        self.blocks = nn.ModuleList(
            Block(
                IntegralTransform(dim, heads=heads, hidden=hidden, domain=domain, lowering="dense", seed=i, **kw),
                dim,
                ff,
            )
            for i in range(depth)
        )
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, img: torch.Tensor) -> torch.Tensor:  # img [B, 8, 8]
        keep = None
        if self.domain == "grid":
            u, coords = self.embed(img[..., None]), None  # [B, 8, 8, dim]
        elif self.sparse:
            u, coords, keep = self.sparse_points(img)
        else:
            b = img.shape[0]
            r, c = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
            coords = torch.stack([r, c], -1).reshape(1, 64, 2).expand(b, 64, 2)
            vals = img.reshape(b, 64)
            if self.training:  # a point set has no order: a fresh permutation per sample
                perm = torch.rand(b, 64).argsort(1)
                vals, coords = vals.gather(1, perm), coords.gather(1, perm[..., None].expand(b, 64, 2))
            u = self.embed(vals[..., None])  # [B, 64, dim]
        for blk in self.blocks:
            u = blk(u, coords, keep)
        u = u.reshape(u.shape[0], -1, u.shape[-1])
        if keep is None:
            pooled = u.mean(1)
        else:
            w = keep.to(u.dtype)[..., None]
            pooled = (u * w).sum(1) / w.sum(1)
        return self.head(self.norm(pooled))

    def sparse_points(self, img: torch.Tensor):
        """The non-zero pixels as points, padded to ``PAD``; ``keep`` [B, PAD] bool is the layer's padding mask."""
        b = img.shape[0]
        vals = img.reshape(b, 64)
        r, c = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
        grid = torch.stack([r, c], -1).reshape(64, 2)
        keep = vals > 0
        score = keep.float() + (torch.rand(b, 64) if self.training else 0.0) * 0.5  # kept first, in random order
        order = score.argsort(1, descending=True)[:, :PAD]
        # a padding point (a zero pixel) keeps its own coordinates and value: the mask takes it out of the measure
        return self.embed(vals.gather(1, order)[..., None]), grid[order], keep.gather(1, order)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, img):
        return self.net(img[:, None])


class Transformer(nn.Module):
    def __init__(self, dim: int = DIM, depth: int = 2, heads: int = 4, ff: int = 96):
        super().__init__()
        self.embed = nn.Linear(1, dim)
        self.pos = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.enc = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, img):
        u = self.embed(img.reshape(img.shape[0], 64, 1)) + self.pos
        return self.head(self.norm(self.enc(u).mean(1)))


MODELS = {
    "itnet-grid": lambda: ITNetClassifier("grid"),
    "itnet-points": lambda: ITNetClassifier("points"),
    "itnet-sparse": lambda: ITNetClassifier("points", sparse=True),
    "cnn": CNN,
    "transformer": Transformer,
}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    model.train()
    return (pred == y).float().mean().item()


def train(name: str, data, epochs: int, batch: int = 64, lr: float = 3e-3, seed: int = 0) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = MODELS[name]()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=1e-2)
    steps = epochs * ((len(xtr) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1, anneal_strategy="cos")
    gen = torch.Generator().manual_seed(seed)
    curve, seconds = [], 0.0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        seconds += time.perf_counter() - t0
        curve.append({"epoch": epoch, "train_loss": total / len(xtr), "test_acc": accuracy(model, xte, yte)})
    return {"model": name, "params": params, "test_accuracy": curve[-1]["test_acc"],
            "best_test_accuracy": max(c["test_acc"] for c in curve), "train_accuracy": accuracy(model, xtr, ytr),
            "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "curve": curve}  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        ep = [c["epoch"] for c in r["curve"]]
        ls = "--" if r["model"] == "itnet-points" else "-"  # on top of itnet-grid (the same function)
        a1.plot(ep, [c["test_acc"] for c in r["curve"]], ls, label=f"{r['model']} ({r['params']} params)")
        a2.semilogy(ep, [c["train_loss"] for c in r["curve"]], ls, label=r["model"])
    a1.set_ylim(0.5, 1.0)
    a1.set_xlabel("epoch")
    a1.set_ylabel("test accuracy (360 images)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("training cross-entropy")
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle("sklearn digits 8×8, 80/20 split (seed 0), same optimiser and epochs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(MODELS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = sorted(set(names) - set(MODELS))
    if bad:
        ap.error(f"unknown models {bad}; models are {list(MODELS)}")
    data = load()
    print(f"digits: {len(data[0])} train, {len(data[2])} test; {args.epochs} epochs, batch 64, AdamW 3e-3")
    hdr = f"{'model':<14} {'params':>7} {'test acc':>9} {'best':>7} {'train acc':>10} {'train s':>8}"
    print(hdr)
    print("-" * len(hdr))
    rows, t_all = [], time.perf_counter()
    for name in names:
        r = train(name, data, args.epochs)
        rows.append(r)
        print(f"{name:<14} {r['params']:>7} {r['test_accuracy']:>9.4f} {r['best_test_accuracy']:>7.4f} "
              f"{r['train_accuracy']:>10.4f} {r['train_seconds']:>8.1f}", flush=True)  # fmt: skip
    total = time.perf_counter() - t_all
    print(f"total {total:.1f} s ({args.threads} torch threads)")
    name = "itnet_classifier" if args.epochs == 30 else f"itnet_classifier.e{args.epochs}"
    prev = RESULTS / f"{name}.json"
    if prev.exists():  # an --only run replaces its models' rows and keeps the others
        old = json.loads(prev.read_text())
        kept = [r for r in old.get("rows", []) if r["model"] not in names]
        for r in kept:  # rows written before rows recorded their threads
            r.setdefault("threads", old.get("threads"))
        rows = kept + rows
    order = list(MODELS)
    rows.sort(key=lambda r: order.index(r["model"]))
    path = write_result(name, {"epochs": args.epochs, "batch": 64, "optimizer": "AdamW lr 3e-3 wd 1e-2",
                               "split": "stratified 80/20, random_state=0", "threads": args.threads,
                               "seconds_this_run": round(total, 1), "models_this_run": names, "rows": rows},
                        quick=False)  # fmt: skip
    DOCS.mkdir(exist_ok=True)
    plot(rows, DOCS / f"{name.replace('.', '_')}_curves.png")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")
    main()
