"""Shared helpers for the benchmark scripts: repo-root import path, machine info, timing, JSON results.

Benchmarks report ratios against a baseline measured in the same run; they are never timed assertions in tests.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["mem_total_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def write_result(name: str, payload: dict[str, object], quick: bool) -> Path:
    """Write ``bench/results/NAME.json`` (``NAME.quick.json`` for smoke runs, so they never overwrite real results)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")
    payload = {"benchmark": name, "quick": quick, "machine": machine_info(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def interleaved(fns: dict[str, Callable[[], object]], iters: int, warmup: int) -> dict[str, list[float]]:
    """Time each callable ``iters`` times in round-robin order (the order rotates every round), in milliseconds.

    Interleaving puts every candidate under the same drift (frequency scaling, other processes, cache state), so the
    ratio of medians is far steadier than timing one candidate's block after another's.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(iters):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter_ns()
            fns[n]()
            times[n].append((time.perf_counter_ns() - t0) / 1e6)
    return times


def summary(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=4) if len(ms) >= 4 else [min(ms), statistics.median(ms), max(ms)]
    return {
        "median_ms": statistics.median(ms),
        "p25_ms": q[0],
        "p75_ms": q[2],
        "min_ms": min(ms),
        "n": len(ms),
    }
