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


def git_state() -> str:
    """``HEAD``'s short hash, with ``+dirty`` when the package or the benchmarks have uncommitted changes."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "itnet_compiler", "bench"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        # other processes on the box skew timings; the 1-minute load average when the result is written says how much
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    info["git"] = git_state()
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
    return interleaved_wall_cpu(fns, iters, warmup)[0]


def interleaved_wall_cpu(
    fns: dict[str, Callable[[], object]], iters: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """As ``interleaved``, also recording the process CPU time of every call (ms).

    On a shared box, wall time includes the time other processes hold the cores; process CPU time does not, so
    with one torch thread (everything runs on the calling thread) it is the steadier measure of work done.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(iters):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            c0 = time.process_time_ns()
            t0 = time.perf_counter_ns()
            fns[n]()
            t1 = time.perf_counter_ns()
            c1 = time.process_time_ns()
            wall[n].append((t1 - t0) / 1e6)
            cpu[n].append((c1 - c0) / 1e6)
    return wall, cpu


def summary(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=4) if len(ms) >= 4 else [min(ms), statistics.median(ms), max(ms)]
    return {
        "median_ms": statistics.median(ms),
        "p25_ms": q[0],
        "p75_ms": q[2],
        "min_ms": min(ms),
        "n": len(ms),
    }
