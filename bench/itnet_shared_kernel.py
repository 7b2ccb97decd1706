"""A position-only ITNet kernel (``content=False``) shared by the batch against the same kernel computed per batch
entry (ρ, γ expanded to the batch, as a content kernel must be), one training step of the torch ``fused`` lowering.

    python bench/itnet_shared_kernel.py [--batch 8] [--n 512] [--threads 2]

Prints seconds per step (median of 3, same run, same inputs) and the ratio; outputs agree to float32 rounding."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from itnet_compiler.backends.torch.mlp import mlp_fused


def step(rho, gamma, x, v, params) -> tuple[float, torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in (rho, gamma, v, *params)]
    t0 = time.perf_counter()
    out = mlp_fused(None, None, leaves[0], leaves[1], x, x, leaves[2], None, *leaves[3:], normalize=False,
                    causal=True, features=("offset", "dist2", "fourier"), measure="counting")  # fmt: skip
    out.square().sum().backward()
    return time.perf_counter() - t0, out.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, n, hd, heads = args.batch, args.n, args.hidden, 4
    rho, gamma = torch.randn(1, n, hd), torch.zeros(1, n, hd)
    x = (torch.arange(n, dtype=torch.float32) / n)[None, :, None]
    v = torch.randn(b, heads, n, 16)
    params = [torch.randn(hd, 1) * 0.3, torch.randn(hd) * 0.1, torch.randn(hd, 1), torch.randn(hd), torch.randn(hd),
              torch.randn(heads, hd) / hd**0.5, torch.randn(heads)]  # fmt: skip
    cases = {"shared (batch 1)": (rho, gamma), "per entry (batch B)": (rho.expand(b, n, hd), gamma.expand(b, n, hd))}
    res = {}
    for name, (r, g) in cases.items():
        times, out = [], None
        for _ in range(3):
            t, out = step(r, g, x, v, params)
            times.append(t)
        res[name] = (statistics.median(times), out)
    (ts, os_), (te, oe) = res["shared (batch 1)"], res["per entry (batch B)"]
    print(f"B={b} N={n} hidden={hd} heads={heads}, torch fused, forward+backward, {args.threads} threads")
    print(f"  per entry (batch B): {te:.3f} s   shared (batch 1): {ts:.3f} s   ratio {te / ts:.2f}x")
    print(f"  max |difference| of the outputs: {(os_ - oe).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
