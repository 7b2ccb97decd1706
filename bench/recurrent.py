"""CPU time of the recurrent lowerings against their references, all in one run.

1. A Mamba layer (transformers ``MambaMixer`` at mamba-130m sizes: hidden 768, inner 1536, state 16, conv 4, Δ rank
   48; batch 1) at L = 1024 and 4096: HF's reference CPU path (its Python loop over time) against the ``scan`` and
   ``chunked`` lowerings, both built from one program converted with a dynamic length.
2. The S4D layer of ``tests/s4d.py`` (H 64 channels, N 64, batch 2) at L = 16384: the ``fft`` lowering of its
   ``stationary`` capture against the ``scan`` lowering of its recurrent ``ssm`` capture, with the paper's FFT code
   (the eager module) as the reference.
3. For contrast, a Mamba2 layer (``Mamba2Mixer`` at mamba2-130m sizes: 24 heads of 64, state 128, one group, chunk
   256) at the same lengths: there A is one scalar per head, which is what the chunked (SSD) form is built for, and
   HF's reference path is itself chunked.

Method: every candidate's output is first compared with the reference and with the source layer run in float64
(max |Δ| / max |ref|); then the candidates are timed interleaved (round-robin, order rotating each round) after a
warmup under ``torch.no_grad()``, medians compared. One torch thread by default: on a shared 2-core box, OpenMP's
wake-ups in a loop of small steps cost more than they save and make two-thread timings erratic.
Results go to ``bench/results/recurrent.json`` (``--quick``: small sizes, ``recurrent.quick.json``).

    python bench/recurrent.py [--quick] [--iters N] [--threads T]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from _common import interleaved, summary, write_result  # noqa: E402
from torch import nn  # noqa: E402

import itnet_compiler as itc  # noqa: E402


class Wrap(nn.Module):
    """One layer as a model: converters capture the child, so the layer itself is what gets converted."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def float64_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer in float64. HF's Mamba2 path casts to float32 inside (``.float()``), so there only the projections
    run in float64 and its figures say little about the scan."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def compare(
    name: str, length: int, fns: dict[str, object], ref: str, exact: torch.Tensor, iters: int, warmup: int
) -> dict[str, object]:
    with torch.no_grad():
        outs = {k: f() for k, f in fns.items()}
        errors = {k: rel_err(v, outs[ref]) for k, v in outs.items() if k != ref}
        exact_errors = {k: rel_err(v, exact) for k, v in outs.items()}
        times = interleaved(fns, iters, warmup)
    stats = {k: summary(v) for k, v in times.items()}
    base = stats[ref]["median_ms"]
    row = {
        "case": name,
        "length": length,
        "reference": ref,
        "median_ms": {k: round(s["median_ms"], 3) for k, s in stats.items()},
        "speedup_vs_reference": {k: round(base / s["median_ms"], 3) for k, s in stats.items() if k != ref},
        "rel_err_vs_reference": errors,
        "rel_err_vs_float64": exact_errors,
        "stats": stats,
    }
    print(f"{name} L={length}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row["median_ms"].items()))
    print(f"    speedup vs {ref}: {row['speedup_vs_reference']}  rel err vs float64: "
          + ", ".join(f"{k} {v:.1e}" for k, v in exact_errors.items()))  # fmt: skip
    return row


def mamba_rows(version: int, lengths: list[int], quick: bool, iters: int) -> list[dict[str, object]]:
    import transformers

    torch.manual_seed(0)
    if version == 1:
        sizes = {"hidden_size": 96, "state_size": 8} if quick else {"hidden_size": 768, "state_size": 16}
        cfg = transformers.MambaConfig(**sizes, num_hidden_layers=1, vocab_size=16, use_cache=False)
        model = Wrap(transformers.MambaModel(cfg).layers[0].mixer).eval()
    else:
        sizes = {"hidden_size": 96, "state_size": 16, "num_heads": 6, "head_dim": 32, "chunk_size": 64}
        if not quick:
            sizes = {"hidden_size": 768, "state_size": 128, "num_heads": 24, "head_dim": 64, "chunk_size": 256}
        cfg = transformers.Mamba2Config(**sizes, n_groups=1, num_hidden_layers=1, vocab_size=16, use_cache=False)
        model = Wrap(transformers.Mamba2Model(cfg).layers[0].mixer).eval()
    seq = torch.export.Dim("L", min=2, max=1 << 16)
    prog = itc.convert(model, (torch.randn(1, 64, cfg.hidden_size),), dynamic_shapes={"x": {1: seq}})
    built = {low: itc.build(prog, plan={"layer": low}) for low in ("scan", "chunked")}
    rows = []
    for length in lengths:
        x = torch.randn(1, length, cfg.hidden_size, generator=torch.Generator().manual_seed(length))
        fns = {"hf": lambda x=x: model(x), **{k: (lambda m=m, x=x: m(x)) for k, m in built.items()}}
        exact = float64_output(model, x)
        row = compare(f"mamba{'' if version == 1 else '2'}-layer", length, fns, "hf", exact, iters, warmup=1)
        row["config"] = {**sizes, "intermediate_size": cfg.expand * cfg.hidden_size, "batch": 1}
        rows.append(row)
    return rows


def s4d_rows(length: int, quick: bool, iters: int) -> list[dict[str, object]]:
    from s4d import S4D, captured_as

    torch.manual_seed(0)
    h, n = (16, 16) if quick else (64, 64)
    model = Wrap(S4D(h, n)).eval()
    seq = torch.export.Dim("L", min=2, max=1 << 17)
    example = (torch.randn(2, h, 64),)
    built = {}
    for form, lows in (("stationary", ("fft",)), ("ssm", ("scan",))):
        with captured_as(form):
            prog = itc.convert(model, example, dynamic_shapes={"x": {2: seq}})
        built.update({low: itc.build(prog, plan={"layer": low}) for low in lows})
    x = torch.randn(2, h, length, generator=torch.Generator().manual_seed(0))
    fns = {"eager-fft": lambda: model(x), **{k: (lambda m=m: m(x)) for k, m in built.items()}}
    row = compare("s4d-layer", length, fns, "eager-fft", float64_output(model, x), iters, warmup=1)
    row["config"] = {"channels": h, "state": n, "batch": 2}
    row["fft_speedup_vs_scan"] = round(row["median_ms"]["scan"] / row["median_ms"]["fft"], 2)
    # The stationary capture (and the eager layer) first generate the kernel from A, B, C, Δ: O(H·N·L) complex
    # exponentials, the same generic ops in both, which bound the fft side; the scan needs no kernel.
    with torch.no_grad():
        kernel_ms = summary(interleaved({"kernel": lambda: model.layer.kernel(length)}, iters, 1)["kernel"])
    row["kernel_generation_ms"] = round(kernel_ms["median_ms"], 3)
    print(f"    of which kernel generation {row['kernel_generation_ms']:.1f} ms")
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    iters = ns.iters or (3 if ns.quick else 7)
    lengths = [256, 512] if ns.quick else [1024, 4096]
    rows = mamba_rows(1, lengths, ns.quick, iters) + mamba_rows(2, lengths, ns.quick, iters)
    rows += s4d_rows(2048 if ns.quick else 16384, ns.quick, iters)
    path = write_result("recurrent", {"iters": iters, "threads": ns.threads, "results": rows}, ns.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
