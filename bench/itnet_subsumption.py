"""The subsumption claim on small CPU runs: one ITNet layer fitted to fixed random operators by operator regression.

    python bench/itnet_subsumption.py [--quick] [--only conv,attention,s4d,gru] [--threads 2]

Each target is a FIXED random operator T: a 1-D convolution (``nn.Conv1d``, kernel 5, padding 2, channels = dim),
a softmax attention layer (``nn.MultiheadAttention``), a causal S4D layer (diagonal complex state space, written
below in plain torch) and a GRU (``nn.GRU``). The model is one ``itnet_compiler.nn.IntegralTransform`` (for some
variants between a linear lift dim → width and a linear read-out width → dim), fitted with Adam (one-cycle schedule)
on batches of fresh Gaussian inputs u to T(u) / s, s the target's output standard deviation on the held-out set.
Reported: the relative error ‖ŷ − y‖ / ‖y‖ on 256 HELD-OUT Gaussian inputs of the training length, and on 128 of
twice that length (the layer is applied unchanged; a convolution or S4D target is defined at any length), and as a
reference the held-out error of the best linear time-invariant operator (every lag, least squares): what a fixed
kernel of the offset alone can reach.

Variants (several per target; ``--quick`` runs the first of each with fewer steps and draws no plots):

* ``conv``, all three with a position-only kernel (``content=False``, features offset, dist2, fourier: a
  translation-invariant operator): ``lift40`` (lift to width 40 = 5 heads × 8 channels, the uniform measure 1/M of
  ``normalize=False``), ``width8`` (no lift: one head's kernel is a scalar function of the offset times a rank
  dim/heads channel map, so a dim-wide layer cannot hold a generic 5-tap channel-mixing convolution),
  ``lift40-counting`` (as lift40 with ``measure="counting"``, Σ_j instead of (1/M) Σ_j, the kernel's output layer
  scaled by 1/32 at init so that it starts from the operator lift40 starts from — the only variant whose kernel
  means the same operator at another length).
* ``attention``: the layer as is (``normalize=True``, all four pair features, heads = the target's heads).
* ``s4d``: ``positional`` (heads = dim, one channel per head, causal support, uniform measure, coordinates scaled to
  [0, 1), ``content=False``: the kernel is a function of the offset alone), ``content`` (the same features with
  ``content=True``, the default: ρ = C u + c and γ = D u at their default init and trained, so the kernel also
  depends on the input).
* ``gru``: lift to width 32, causal, uniform measure, all pair features (a single integral transform is linear in
  its values; a GRU is not).

Writes ``bench/results/itnet_subsumption.json`` (``.quick.json`` with ``--quick``; an ``--only`` run replaces the
rows of the targets it ran and keeps the others) and, without ``--quick``, ``docs/itnet_subsumption_curves.png``
(held-out error over training), ``docs/itnet_subsumption_conv_impulse.png`` and
``docs/itnet_subsumption_s4d_impulse.png`` (learned vs target impulse responses).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import RESULTS, ROOT, write_result  # noqa: E402
from torch import nn  # noqa: E402

from itnet_compiler.nn import IntegralTransform  # noqa: E402

DOCS = ROOT / "docs"
POSITIONAL = ("offset", "dist2", "fourier")
LTI = dict(features=POSITIONAL, content=False)  # a kernel of the offset alone: a translation-invariant operator


# ----------------------------------------------------------------------------------------------------------- targets


class S4D(nn.Module):
    """A fixed causal S4D layer on [B, L, H]: y = K * u + D ⊙ u per channel, K_l = 2 Re Σ_n C_n B̄_n exp(l Δ A_n).

    S4D-Lin: A_n = −1/2 + iπn (n < n_modes, each with its conjugate, hence the 2 Re), Δ log-uniform in [1e-3, 1e-1]
    per channel, ZOH B̄ = (exp(ΔA) − 1)/A with B = 1, C ~ CN(0, 1) rescaled per channel so that ‖K‖₂ = 1 over the
    training length (C is free in S4D; this keeps the slow channels from vanishing next to D), D ~ N(0, 1). Applied
    as a causal convolution through a zero-padded FFT.
    """

    def __init__(self, channels: int, length: int, n_modes: int = 8, dt=(1e-3, 1e-1), seed: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        log_dt = torch.rand(channels, generator=g) * (math.log(dt[1]) - math.log(dt[0])) + math.log(dt[0])
        a = torch.complex(
            -0.5 * torch.ones(channels, n_modes), math.pi * torch.arange(n_modes).float().expand(channels, n_modes)
        )
        c = torch.complex(torch.randn(channels, n_modes, generator=g), torch.randn(channels, n_modes, generator=g))
        dta = a * log_dt.exp()[:, None]
        self.dta, self.cb = dta, c * math.sqrt(0.5) * (torch.exp(dta) - 1) / a
        self.cb = self.cb / self.kernel(length).norm(dim=1)[:, None]
        self.d = torch.randn(channels, generator=g)
        self.dt = log_dt.exp()

    def kernel(self, length: int) -> torch.Tensor:
        """K [H, L]."""
        pos = torch.arange(length, dtype=torch.float32)
        return 2 * (self.cb[:, :, None] * torch.exp(self.dta[:, :, None] * pos)).sum(1).real

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        n = u.shape[1]
        uf = torch.fft.rfft(u.transpose(1, 2), n=2 * n)
        y = torch.fft.irfft(uf * torch.fft.rfft(self.kernel(n), n=2 * n), n=2 * n)[..., :n]
        return (y + self.d[:, None] * u.transpose(1, 2)).transpose(1, 2)


def make_conv(dim: int, seed: int = 1) -> tuple[Callable, dict]:
    torch.manual_seed(seed)
    conv = nn.Conv1d(dim, dim, 5, padding=2).requires_grad_(False)
    info = {
        "module": "nn.Conv1d(dim, dim, 5, padding=2), default init",
        "params": sum(p.numel() for p in conv.parameters()),
    }
    return (lambda u: conv(u.transpose(1, 2)).transpose(1, 2)), {**info, "_module": conv}


def make_attention(dim: int, heads: int = 2, qk_gain: float = 2.0, seed: int = 2) -> tuple[Callable, dict]:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(dim, heads, batch_first=True).requires_grad_(False)
    with torch.no_grad():  # default init gives logits of std ≈ 0.5 (near-uniform attention): sharpen the q/k maps
        mha.in_proj_weight[: 2 * dim] *= qk_gain
    info = {"module": f"nn.MultiheadAttention({dim}, {heads}, batch_first=True), default init, W_q and W_k × {qk_gain}",
            "params": sum(p.numel() for p in mha.parameters())}  # fmt: skip
    return (lambda u: mha(u, u, u, need_weights=False)[0]), {**info, "_module": mha}


def attention_stats(mha: nn.MultiheadAttention, dim: int, n: int) -> dict[str, float]:
    with torch.no_grad():
        u = torch.randn(64, n, dim, generator=torch.Generator().manual_seed(7))
        _, w = mha(u, u, u, average_attn_weights=False)
        ent = -(w * w.clamp_min(1e-12).log()).sum(-1).mean().item()
    return {"mean_max_weight": round(w.max(-1).values.mean().item(), 3), "entropy": round(ent, 3),
            "uniform_entropy": round(math.log(n), 3)}  # fmt: skip


def make_s4d(dim: int, length: int) -> tuple[Callable, dict]:
    s4d = S4D(dim, length)
    info = {"module": "S4D-Lin, 8 complex modes/channel, Δ log-uniform [1e-3, 1e-1], ‖K‖₂ = 1 per channel, D ~ N(0,1)",
            "params": 3 * dim * 8 + 2 * dim, "dt": [round(x, 5) for x in s4d.dt.tolist()]}  # fmt: skip
    return s4d, {**info, "_module": s4d}


def make_gru(dim: int, seed: int = 4) -> tuple[Callable, dict]:
    torch.manual_seed(seed)
    gru = nn.GRU(dim, dim, batch_first=True).requires_grad_(False)
    info = {
        "module": f"nn.GRU({dim}, {dim}, batch_first=True), default init",
        "params": sum(p.numel() for p in gru.parameters()),
    }
    return (lambda u: gru(u)[0]), {**info, "_module": gru}


# ------------------------------------------------------------------------------------------------------------ model


class OperatorNet(nn.Module):
    """[lift dim → width] → IntegralTransform(width) → [read-out width → dim]; lift and read-out only if width ≠ dim.

    ``kernel_scale``: the kernel MLP's output layer ``w_out`` is multiplied by it at init (``b_out`` starts at zero,
    so K is). With ``measure="counting"`` and kernel_scale = 1/N, N the training length, the layer starts from the
    operator the uniform measure starts from at N; unscaled, it starts N times larger and Adam fits it worse.
    """

    def __init__(self, dim: int, width: int, *, kernel_scale: float = 1.0, **layer):
        super().__init__()
        self.lift = nn.Linear(dim, width) if width != dim else nn.Identity()
        self.it = IntegralTransform(width, **layer)
        self.read = nn.Linear(width, dim) if width != dim else nn.Identity()
        with torch.no_grad():
            self.it.kernel.w_out.mul_(kernel_scale)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.read(self.it(self.lift(u)))


@dataclass
class Variant:
    target: str  # conv, attention, s4d, gru
    name: str
    length: int
    steps: int
    lr: float
    width: int
    layer: dict
    batch: int = 32
    kernel_scale: float = 1.0  # the kernel's output layer times this at init (1/N with the counting measure)
    quick: int = 0  # steps under --quick (0: the variant does not run under --quick)
    extra: dict = field(default_factory=dict)


def variants(dim: int) -> list[Variant]:
    n_s4d = 64
    return [
        Variant("conv", "lift40", 32, 1500, 3e-3, 40, dict(heads=5, hidden=32, normalize=False, **LTI), quick=1000),
        Variant("conv", "width8", 32, 1500, 3e-3, dim, dict(heads=4, hidden=32, normalize=False, **LTI)),
        Variant("conv", "lift40-counting", 32, 1500, 3e-3, 40,
                dict(heads=5, hidden=32, normalize=False, measure="counting", **LTI), kernel_scale=1 / 32),
        Variant("attention", "default", 32, 3000, 3e-3, dim, dict(heads=2, hidden=32, normalize=True), quick=1000),
        Variant("s4d", "positional", n_s4d, 2000, 3e-2, dim,
                dict(heads=dim, hidden=64, normalize=False, support="causal", coord_scale=1 / n_s4d,
                     fourier_scale=1 / n_s4d, **LTI), batch=16, quick=700),
        Variant("s4d", "content", n_s4d, 1000, 3e-2, dim,
                dict(heads=dim, hidden=64, features=POSITIONAL, normalize=False, support="causal",
                     coord_scale=1 / n_s4d, fourier_scale=1 / n_s4d), batch=16),
        Variant("gru", "lift32", 32, 3000, 3e-3, 32,
                dict(heads=4, hidden=64, normalize=False, support="causal", coord_scale=1 / 32, fourier_scale=1 / 32),
                quick=800),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ fit


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def fit(v: Variant, dim: int, steps: int, log_every: int) -> tuple[dict, nn.Module, nn.Module, float]:
    make = {"conv": lambda: make_conv(dim), "attention": lambda: make_attention(dim),
            "s4d": lambda: make_s4d(dim, v.length), "gru": lambda: make_gru(dim)}[v.target]  # fmt: skip
    target, info = make()
    module = info.pop("_module")
    if v.target == "attention":
        info.update(attention_stats(module, dim, v.length))
    n = v.length
    with torch.no_grad():
        u_held = torch.randn(256, n, dim, generator=torch.Generator().manual_seed(1000))
        y_held = target(u_held)
        scale = y_held.std().item()
        u_long = torch.randn(128, 2 * n, dim, generator=torch.Generator().manual_seed(1001))
        y_long = target(u_long)
    torch.manual_seed(0)
    model = OperatorNet(dim, v.width, kernel_scale=v.kernel_scale, lowering="dense", **v.layer)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, v.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, v.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    curve: list[tuple[int, float, float]] = []
    train_s, t0 = 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        u = torch.randn(v.batch, n, dim, generator=gen)
        with torch.no_grad():
            y = target(u) / scale
        loss = (model(u) - y).square().mean() / y.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            train_s += time.perf_counter() - t0
            with torch.no_grad():
                held = rel(model(u_held) * scale, y_held)
            curve.append((step, math.sqrt(loss.item()), held))
            t0 = time.perf_counter()
    train_s += time.perf_counter() - t0
    with torch.no_grad():
        held = rel(model(u_held) * scale, y_held)
        long = rel(model(u_long) * scale, y_long)
    causal = v.layer.get("support") == "causal"
    lti = lti_reference(target, dim, n, causal, u_held, y_held)
    row = {
        "target": v.target, "variant": v.name, "held_out_rel_error": held, "rel_error_at_2x_length": long,
        "best_lti_rel_error": lti,
        "steps": steps, "train_seconds": round(train_s, 1), "params": sum(p.numel() for p in params),
        "dim": dim, "length": n, "width": v.width, "batch": v.batch, "lr": v.lr,
        "content": v.layer.get("content", True), "measure": v.layer.get("measure", "uniform"),
        "kernel_scale": v.kernel_scale,
        "layer": {k: list(x) if isinstance(x, tuple) else x for k, x in v.layer.items()},
        "target_info": info, "output_scale": scale, "curve": curve,
    }  # fmt: skip
    return row, model, module, scale


def lti_reference(
    target: Callable, dim: int, n: int, causal: bool, u_held: torch.Tensor, y_held: torch.Tensor
) -> float:
    """Held-out relative error of the best linear time-invariant operator (least squares, float64, over 4096 random
    inputs): y_i = Σ_l W_l u_{i−l} + b with every lag the length allows (l ≥ 0 when causal), channels mixed freely.
    ≈ 0 for the convolution and S4D targets; for attention and the GRU, what no fixed kernel of the offset can beat."""
    lags = list(range(n)) if causal else list(range(-(n - 1), n))

    def feats(u: torch.Tensor) -> torch.Tensor:
        b = u.shape[0]
        pad = torch.cat([u.new_zeros(b, n - 1, dim), u, u.new_zeros(b, n - 1, dim)], 1)  # u_k at k + n − 1
        cols = [pad[:, n - 1 - lag : 2 * n - 1 - lag] for lag in lags]  # u_{i − lag}
        x = torch.stack(cols, 2).reshape(b * n, len(lags) * dim)
        return torch.cat([x, x.new_ones(b * n, 1)], 1).double()

    gen = torch.Generator().manual_seed(2000)
    f = len(lags) * dim + 1
    xtx, xty = torch.zeros(f, f, dtype=torch.float64), torch.zeros(f, dim, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(16):
            u = torch.randn(256, n, dim, generator=gen)
            x = feats(u)
            xtx += x.T @ x
            xty += x.T @ target(u).reshape(-1, dim).double()
        w = torch.linalg.solve(xtx + 1e-8 * torch.eye(f, dtype=torch.float64), xty)
        pred = (feats(u_held) @ w).reshape(y_held.shape)
    return rel(pred, y_held.double())


# --------------------------------------------------------------------------------------------------------- impulses


def impulse(model: nn.Module, scale: float, dim: int, n: int, at: int) -> torch.Tensor:
    """Model response to e_c at position ``at`` minus its response to zeros: [c_in, n, c_out]."""
    with torch.no_grad():
        u = torch.zeros(dim, n, dim)
        u[range(dim), at, range(dim)] = 1.0
        return (model(u) - model(torch.zeros_like(u))) * scale


def plot_conv_impulse(model, scale, conv: nn.Conv1d, dim: int, n: int, path) -> float:
    import matplotlib.pyplot as plt

    at = n // 2
    resp = impulse(model, scale, dim, n, at)  # [c_in, l, c_out]; y_l = Σ_k W[o, i, k] u_{l + k − 2}
    offs = list(range(-4, 5))
    learned = torch.stack([resp[:, at + o, :] for o in offs], -1).transpose(0, 1)  # [c_out, c_in, offs]
    want = torch.zeros(dim, dim, len(offs))
    want[:, :, 2:7] = conv.weight.flip(-1)  # offset o = l − at ↔ tap k = 2 − o
    err = rel(learned, want)
    fig, axes = plt.subplots(2, 4, figsize=(12, 5), sharex=True)
    for ax, (o, i) in zip(axes.flat, [(0, 0), (0, 1), (1, 2), (2, 5), (3, 3), (4, 7), (6, 1), (7, 6)]):
        ax.bar([x - 0.18 for x in offs], want[o, i].numpy(), 0.36, label="target Conv1d tap")
        ax.bar([x + 0.18 for x in offs], learned[o, i].numpy(), 0.36, label="ITNet impulse response")
        ax.set_title(f"out {o} ← in {i}", fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
    axes[0, 0].legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("offset i − j")
    fig.suptitle(
        f"conv (lift40): learned vs target impulse response, relative error {err:.3g} over all 64 channel pairs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return err


def plot_s4d_impulse(model, scale, s4d: S4D, dim: int, n: int, path) -> float:
    import matplotlib.pyplot as plt

    resp = impulse(model, scale, dim, n, 0)  # [c_in, l, c_out]
    learned = torch.stack([resp[c, :, c] for c in range(dim)])  # [H, L] (the D skip is at l = 0)
    want = s4d.kernel(n).clone()
    want[:, 0] += s4d.d
    err = rel(learned, want)
    cross = resp.clone()
    cross[range(dim), :, range(dim)] = 0
    leak = (cross.norm() / want.norm()).item()
    fig, axes = plt.subplots(2, 4, figsize=(13, 5), sharex=True)
    for c, ax in enumerate(axes.flat):
        lags = range(1, n)
        ax.plot(lags, want[c, 1:].numpy(), lw=2, label="target S4D kernel K_l")
        ax.plot(lags, learned[c, 1:].numpy(), "--", lw=1.5, label="ITNet impulse response")
        ax.set_title(f"channel {c}, Δ = {s4d.dt[c]:.3g}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("lag l (l ≥ 1; l = 0 holds the D skip)")
    fig.suptitle(f"s4d (positional): learned vs target kernel, relative error {err:.3g}, cross-channel leak {leak:.2g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return err


def plot_curves(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 3.6), squeeze=False)
    for ax, t in zip(axes[0], targets):
        for r in rows:
            if r["target"] == t:
                steps, _, held = zip(*r["curve"])
                ax.semilogy(steps, held, label=f"{r['variant']} ({r['held_out_rel_error']:.3g})")
        ax.axhline(5e-2, color="grey", ls=":", lw=1)
        ax.set_title(t)
        ax.set_xlabel("Adam step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("held-out relative error")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="first variant of each target, fewer steps, no plots")
    ap.add_argument("--only", default="conv,attention,s4d,gru", help="comma-separated targets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    bad = sorted(set(only) - {"conv", "attention", "s4d", "gru"})
    if bad:
        ap.error(f"unknown targets {bad}")
    todo = [v for v in variants(args.dim) if v.target in only and (v.quick > 0 or not args.quick)]
    rows, t_all = [], time.perf_counter()
    hdr = f"{'target':<10} {'variant':<16} {'held-out rel err':>16} {'at 2x length':>13} {'steps':>6} {'seconds':>8}"
    hdr += f" {'params':>7} {'best LTI':>9}"
    print(hdr)
    print("-" * len(hdr))
    for v in todo:
        steps = v.quick if args.quick else v.steps
        row, model, module, scale = fit(v, args.dim, steps, log_every=max(10, steps // 40))
        if not args.quick and v.target == "conv" and v.name == "lift40":
            out = DOCS / "itnet_subsumption_conv_impulse.png"
            row["impulse_rel_error"] = plot_conv_impulse(model, scale, module, args.dim, v.length, out)
        if not args.quick and v.target == "s4d" and v.name == "positional":
            out = DOCS / "itnet_subsumption_s4d_impulse.png"
            row["impulse_rel_error"] = plot_s4d_impulse(model, scale, module, args.dim, v.length, out)
        rows.append(row)
        print(f"{v.target:<10} {v.name:<16} {row['held_out_rel_error']:>16.4f} {row['rel_error_at_2x_length']:>13.4f} "
              f"{steps:>6} {row['train_seconds']:>8.1f} {row['params']:>7} {row['best_lti_rel_error']:>9.4f}",
              flush=True)  # fmt: skip
    total = time.perf_counter() - t_all
    print(f"total {total:.1f} s ({args.threads} torch threads)")
    prev = RESULTS / ("itnet_subsumption.quick.json" if args.quick else "itnet_subsumption.json")
    if prev.exists():  # an --only run replaces its targets' rows and keeps the others
        kept = [r for r in json.loads(prev.read_text()).get("rows", []) if r["target"] not in only]
        rows = kept + rows
    order = {"conv": 0, "attention": 1, "s4d": 2, "gru": 3}
    rows.sort(key=lambda r: order[r["target"]])
    path = write_result("itnet_subsumption", {"threads": args.threads, "seconds_this_run": round(total, 1),
                                              "targets_this_run": only, "rows": rows}, args.quick)  # fmt: skip
    if not args.quick:
        DOCS.mkdir(exist_ok=True)
        plot_curves(rows, DOCS / "itnet_subsumption_curves.png")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")
    main()
