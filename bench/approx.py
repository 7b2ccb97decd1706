"""Approximate attention lowerings on the workloads of ``attention_workloads.py``: time, peak memory, true error and
self-estimate, against exact ``fused`` and SDPA measured in the same run (CPU).

For each workload (structured, trained, random_peaked) and N ∈ {4k, 8k, 16k, 32k}: causal attention, batch 1, the
workload's heads (4 structured / random, 3 trained) of dim 64. Rows: ``fused`` (the baseline of every ratio), SDPA
(``library``), ``hybrid`` at three budgets, and at N ≤ 8k ``montecarlo`` (per_row and shared, norm proposal,
M = 256; also the query-aware ``probe`` proposal) and ``lowrank`` (favor, nystrom, and learned features fitted
by distillation on the same layer's inputs before timing, r = 256). Error: ‖y - y_ref‖/‖y_ref‖ against the fused
lowering in float64; ``est``: the layer's own estimate (``ErrorEstimate.rel``, hybrid and montecarlo). Timing and
peak memory as in ``bench/lowerings.py`` (median of up to three calls, one more under the memory profiler).

    python bench/approx.py [--quick] [--threads 2]     # --quick: N = 4k only
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import write_result  # noqa: E402
from attention_workloads import make, row_entropy  # noqa: E402
from lowerings import measure  # noqa: E402

from itnet_compiler.backends.torch import lowerings as L  # noqa: E402
from itnet_compiler.backends.torch.runtime import RuntimeState  # noqa: E402

HYBRID = {
    "hybrid blocks=8 M=64": dict(blocks=8, samples=64),
    "hybrid blocks=16 M=128": dict(blocks=16, samples=128),
    "hybrid blocks=32 M=256": dict(blocks=32, samples=256),
}
SMALL_N = {
    "montecarlo per_row M=256": (L.attention_montecarlo, dict(samples=256, mode="per_row", proposal="norm")),
    "montecarlo per_row probe M=256": (L.attention_montecarlo, dict(samples=256, mode="per_row", proposal="probe")),
    "montecarlo shared M=256": (L.attention_montecarlo, dict(samples=256, mode="shared", proposal="norm")),
    "lowrank favor r=256": (L.attention_lowrank, dict(method="favor", rank=256)),
    "lowrank nystrom r=256": (L.attention_lowrank, dict(method="nystrom", rank=256)),
    "lowrank learned r=256": (L.attention_lowrank, dict(method="learned", rank=256)),
}


def run(workload: str, n: int) -> list[dict]:
    q, k, v = make(workload, n)
    scale = 1 / math.sqrt(q.shape[-1])
    common = dict(scale=scale, causal=True, return_weights=False)
    ref = L.attention_fused(q.double(), k.double(), v.double(), **common)
    rows = []

    def row(name, fn, base=None):
        out, sec, peak = measure(fn)
        est = None
        if isinstance(out, tuple):
            out, e = out
            est = e.rel
        err = ((out.double() - ref).norm() / ref.norm()).item()
        r = {"workload": workload, "n": n, "lowering": name, "seconds": sec, "peak_mb": peak / 2**20, "error": err,
             "estimate": est, "vs_fused": sec / base if base else 1.0}  # fmt: skip
        rows.append(r)
        est_s = "" if est is None else f"  est {est:.3g}"
        print(f"{workload:13s} {n:6d}  {name:26s} {sec:8.3f} s  {r['vs_fused']:5.2f}×  {r['peak_mb']:8.1f} MB  "
              f"err {err:.3g}{est_s}", flush=True)  # fmt: skip
        return sec

    base = row("fused", lambda: L.attention_fused(q, k, v, **common))
    row("library (SDPA)", lambda: L.attention_library(q, k, v, **common), base)
    for name, opts in HYBRID.items():
        row(name, lambda o=opts: L.attention_hybrid(q, k, v, **common, return_error=True, **o), base)
    if n <= 8192:
        for name, (fn, opts) in SMALL_N.items():
            extra = {"return_error": True} if fn is L.attention_montecarlo else {}
            call = lambda f=fn, o=opts, x=extra: f(q, k, v, **common, **x, **o, layer="attn")  # noqa: E731
            with RuntimeState():  # learned features are fitted once (calibration, not timed), then reused
                if opts.get("method") == "learned":
                    call()
                row(name, call, base)
    rows[0]["entropy"] = row_entropy(q, k)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [4096] if args.quick else [4096, 8192, 16384, 32768]
    results = []
    for workload in ("structured", "trained", "random_peaked"):
        for n in sizes:
            if workload == "random_peaked" and n not in (4096, sizes[-1]):
                continue
            results.extend(run(workload, n))
    write_result("approx", {"threads": args.threads, "rows": results}, args.quick)


if __name__ == "__main__":
    main()
