"""The tuner on a decoder whose attention is structured (``attention_workloads.StructuredDecoder``), at long sequences.

    PYTHONPATH=. python bench/tune_decoder.py [--sizes 4096 16384] [--budget 2e-2] [--repeat 3] [--json FILE]

Per sequence length: convert the model, ``itc.tune`` it at the budget (calibration inputs seed 1, held-out seed 2),
then, in one run on inputs neither saw (seed 3), time eager, ``torch.compile``, the exact plan and the tuned plan
(``itnet_compiler.benchmark.bench``: median of ``repeat`` calls after a warm-up) and measure each one's relative
error against eager. Writes ``bench/results/tune_decoder.json``."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_workloads import StructuredDecoder, structured_embeddings  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.benchmark import bench  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def one(n: int, budget: float, repeat: int, compile_: bool) -> dict:
    model = StructuredDecoder().eval()
    x = {s: structured_embeddings(n, seed=s) for s in (0, 1, 2, 3)}
    prog = itc.convert(model, (x[0],))
    t0 = time.perf_counter()
    last = [0.0]

    def progress(layer: str, what: str, done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 10:
            last[0] = time.perf_counter()
            print(f"  [{n}] {done}/{total} {layer} {what}", flush=True)

    plan = itc.tune(prog, [(x[1],)], budget=budget, held_out=[(x[2],)], repeat=repeat, progress=progress)
    tune_s = time.perf_counter() - t0
    exact, tuned = itc.build(prog), itc.build(prog, plan=plan)
    models = {"eager": model, "itnet exact": exact, "itnet tuned": tuned}
    if compile_:
        models["torch.compile"] = torch.compile(model)
    rows = bench(models, (x[3],), repeat=repeat)
    with torch.no_grad():
        want = model(x[3])
        errors = {name: rel(fn(x[3]), want) for name, fn in models.items() if name != "eager"}
    by = {r["name"]: r for r in rows}
    out = {
        "n": n,
        "budget": budget,
        "tuning_seconds": tune_s,
        "plan": plan.layers,
        "plan_end_to_end": plan.end_to_end,
        "notes": plan.notes,
        "layers": {
            k: {kk: m[kk] for kk in ("exact", "chosen", "exact_seconds", "chosen_seconds")}
            | {
                "candidates": [
                    {c: r.get(c) for c in ("spec", "seconds", "error", "estimate", "end_to_end")}
                    for r in m["candidates"]
                ]
            }  # fmt: skip
            for k, m in plan.measurements.items()
        },
        "rows": [
            {
                "name": r["name"],
                "seconds": r["seconds"],
                "spread": r["spread"],
                "peak_bytes": r["peak_bytes"],
                "vs_eager": r["ratio"],
                "error_vs_eager": errors.get(r["name"], 0.0),
                "failed": r["error"],
            }
            for r in rows
        ],  # fmt: skip
        "tuned_vs_exact": by["itnet tuned"]["seconds"] / by["itnet exact"]["seconds"],
    }
    print(f"N={n}: tuned in {tune_s:.0f}s, plan {plan.layers}")
    for r in out["rows"]:
        print(f"  {r['name']:14s} {1000 * (r['seconds'] or float('nan')):9.1f} ms  ×eager {r['vs_eager'] or 0:.2f}"
              f"  err vs eager {r['error_vs_eager']:.3g}  {r['failed'] or ''}")  # fmt: skip
    e2e = plan.end_to_end["error"]
    print(f"  tuned / exact plan: {out['tuned_vs_exact']:.2f}×, held-out error at tuning {e2e:.3g}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--budget", type=float, default=2e-2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "tune_decoder.json"))
    ns = ap.parse_args()
    results = [one(n, ns.budget, ns.repeat, not ns.no_compile) for n in ns.sizes]
    report = {
        "machine": f"{platform.machine()} cpu, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "results": results,
    }
    Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {ns.json}")


if __name__ == "__main__":
    main()
