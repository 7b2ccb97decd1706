"""Peak CPU memory of the ``fused`` attention lowering against ``dense`` for one attention layer.

Layer: q, k, v of shape [1, 4, N, 64] (batch 1, 4 heads, head dim 64), fp32, N = 8192, no mask; a causal row too.
Each lowering function of ``itnet_compiler.backends.torch.lowerings`` is called directly (``attention_dense``,
``attention_fused`` with its default tiles, and ``attention_library``, i.e. SDPA, for reference).

How peak memory is measured (two independent methods, each lowering call in a fresh subprocess):

1. **RSS high-water mark** (the headline figure). The child builds q, k, v, warms the kernels up on a tiny input,
   then writes ``5`` to ``/proc/self/clear_refs``, which resets the kernel's peak-RSS counter (``VmHWM``) to the
   current RSS. After one call, ``VmHWM - VmRSS(before)`` is the peak extra resident memory of that call: every
   byte the call touched, whoever allocated it (torch's allocator, MKL/oneDNN scratch, glibc arenas). A fresh
   process per call means no freed-but-retained heap from an earlier call can hide an allocation. Where
   ``clear_refs`` is not writable the child falls back to the ``ru_maxrss`` delta (valid because the fresh process's
   earlier high-water mark is its import-time RSS, below the call's peak for the sizes measured here).
2. **Allocator accounting** (a cross-check). A second call runs under ``torch.profiler`` with ``profile_memory=True``;
   every allocation event of c10's CPU allocator carries the running total of bytes allocated since profiling
   began, and its maximum is the call's peak tensor memory. Exact and noise-free, but blind to memory that
   libraries allocate outside torch (MKL packing buffers).

Both include the [1, 4, N, 64] output (8 MiB at N = 8192). Target: fused peak <= 1/10 of dense peak.
Also: fused vs dense numerically at N = 1024 (max abs difference) and the time of each call (single calls at
N = 8192, medians of interleaved calls at N = 1024).

    python bench/attention_memory.py [--quick] [--n 8192] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import interleaved, write_result  # noqa: E402

from itnet_compiler.backends.torch.lowerings import (  # noqa: E402
    attention_dense,
    attention_fused,
    attention_library,
)

LOWERINGS = {"dense": attention_dense, "fused": attention_fused, "library": attention_library}
HEADS, HEAD_DIM = 4, 64
TARGET_RATIO = 0.1
MIB = 2**20


def inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, HEADS, n, HEAD_DIM, generator=g) for _ in range(3))


def call(name: str, q, k, v, causal: bool) -> torch.Tensor:
    return LOWERINGS[name](q, k, v, scale=1.0 / math.sqrt(HEAD_DIM), causal=causal, return_weights=False)


# ------------------------------------------------------------------------------------------------ child process
def _proc_status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    st = _proc_status()
    return st["VmHWM"] == st["VmRSS"]


def _allocator_peak(fn) -> int:
    """Peak bytes held by c10's CPU allocator during ``fn()``, from the profiler's allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.typed[0] == _EventType.Allocation and str(e.typed[1].device) == "cpu":
            peak = max(peak, e.typed[1].total_allocated)  # running total since the profiler started
    return peak


def child(name: str, n: int, causal: bool, threads: int) -> dict[str, object]:
    torch.set_num_threads(threads)
    q, k, v = inputs(n)
    small = [t[..., :128, :].contiguous() for t in (q, k, v)]
    for _ in range(2):  # load kernels and let libraries set up their workspaces before the baseline
        call(name, *small, causal)
    del small
    exact_reset = _reset_peak()
    before_rss = _proc_status()["VmRSS"]
    before_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    out = call(name, q, k, v, causal)
    first_s = time.perf_counter() - t0
    st = _proc_status()
    if exact_reset:
        rss_peak, method = st["VmHWM"] - before_rss, "VmHWM after clear_refs"
    else:
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before_maxrss
        method = "ru_maxrss delta"
    out_bytes = out.numel() * out.element_size()
    del out
    t0 = time.perf_counter()
    call(name, q, k, v, causal)
    second_s = time.perf_counter() - t0
    alloc_peak = _allocator_peak(lambda: call(name, q, k, v, causal))
    return {
        "lowering": name,
        "n": n,
        "causal": causal,
        "rss_peak_bytes": rss_peak,
        "rss_method": method,
        "alloc_peak_bytes": alloc_peak,
        "output_bytes": out_bytes,
        "time_s": min(first_s, second_s),
        "time_first_s": first_s,
    }


# ----------------------------------------------------------------------------------------------- parent process
def measure(name: str, n: int, causal: bool, threads: int) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", name, "--n", str(n), "--threads", str(threads)]
    if causal:
        cmd.append("--causal")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"child {name} N={n} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def numerics(n: int, threads: int, iters: int) -> dict[str, object]:
    torch.set_num_threads(threads)
    q, k, v = inputs(n, seed=1)
    out = {}
    for causal in (False, True):
        ref = call("dense", q, k, v, causal)
        diffs = {m: (call(m, q, k, v, causal) - ref).abs().max().item() for m in ("fused", "library")}
        fns = {m: (lambda m=m, c=causal: call(m, q, k, v, c)) for m in LOWERINGS}
        times = interleaved(fns, iters=iters, warmup=2)
        out["causal" if causal else "full"] = {
            "max_abs_diff_vs_dense": diffs,
            "ref_max_abs": ref.abs().max().item(),
            "median_ms": {m: statistics.median(t) for m, t in times.items()},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 2048 and N = 256 for the numerics: a smoke run")
    ap.add_argument("--n", type=int, default=None, help="sequence length for the memory measurement (default 8192)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--causal", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=sorted(LOWERINGS), help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        print(json.dumps(child(opts.child, opts.n, opts.causal, opts.threads)))
        return

    n = opts.n or (2048 if opts.quick else 8192)
    n_check = 256 if opts.quick else 1024
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {opts.threads} thread(s); q/k/v [1, {HEADS}, N, {HEAD_DIM}]"
    )
    print(f"\npeak memory of one call at N = {n} (fresh process per call; MiB, output included)")
    print(f"{'support':<8} {'lowering':<8} {'RSS peak':>9} {'alloc peak':>11} {'vs dense':>9} {'time s':>8}")
    rows = []
    for causal in (False, True):
        dense = None
        for name in ("dense", "fused", "library"):
            r = measure(name, n, causal, opts.threads)
            dense = dense or r
            r["rss_ratio_vs_dense"] = r["rss_peak_bytes"] / dense["rss_peak_bytes"]
            r["alloc_ratio_vs_dense"] = r["alloc_peak_bytes"] / dense["alloc_peak_bytes"]
            r["time_ratio_vs_dense"] = r["time_s"] / dense["time_s"]
            rows.append(r)
            print(
                f"{'causal' if causal else 'full':<8} {name:<8} {r['rss_peak_bytes'] / MIB:>9.1f} "
                f"{r['alloc_peak_bytes'] / MIB:>11.1f} {r['rss_ratio_vs_dense']:>9.4f} {r['time_s']:>8.3f}"
            )
    fused = [r for r in rows if r["lowering"] == "fused"]
    worst = max(max(r["rss_ratio_vs_dense"], r["alloc_ratio_vs_dense"]) for r in fused)
    meets = worst <= TARGET_RATIO
    print(
        f"fused/dense peak (worst of both methods, both supports): {worst:.4f}; target <= {TARGET_RATIO}: "
        f"{'met' if meets else 'MISSED'}"
    )

    check = numerics(n_check, opts.threads, iters=5 if opts.quick else 20)
    print(f"\nnumerics and time at N = {n_check} (median of interleaved calls)")
    for support, c in check.items():
        d = c["max_abs_diff_vs_dense"]
        t = c["median_ms"]
        print(
            f"{support:<7} max|fused-dense| {d['fused']:.2e}  max|library-dense| {d['library']:.2e}  "
            f"dense {t['dense']:.2f} ms  fused {t['fused']:.2f} ms  library {t['library']:.2f} ms"
        )
    path = write_result(
        "attention_memory",
        {
            "target": f"fused peak <= {TARGET_RATIO} x dense peak",
            "shape": {"batch": 1, "heads": HEADS, "n": n, "head_dim": HEAD_DIM, "dtype": "float32"},
            "threads": opts.threads,
            "fused_over_dense_worst": worst,
            "meets_target": meets,
            "memory": rows,
            "numerics_n": n_check,
            "numerics": check,
        },
        opts.quick,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
