"""Every torch lowering of one layer, side by side: time, peak memory and relative error (CPU, one run).

1. One ``dot_exp`` layer (batch 1, 1 head, d = 64, not causal) at N ∈ {2048, 8192, 32768} on *peaked* inputs
   (q ~ 5·N(0, 1), k, v ~ N(0, 1): mean row entropy ≤ 3 nats, printed, as in trained models). Rows: dense (skipped
   where its N×N temporaries would not fit in half the available memory, and said so), torch SDPA (``library``),
   ``fused``, ``montecarlo`` (per-row and shared sampling, uniform / norm / low-rank-guided proposals, M = 256, and
   M = 1024 for one), ``lowrank`` (FAVOR+, Nyström, learned; rank 256; the learned fit is timed apart). Error:
   ‖y - y_ref‖/‖y_ref‖ against an exact float64 reference; Monte Carlo rows also print their own error estimate.
2. One convolution (Conv2d 128 → 128, 3×3, on 1×128×64×64), with a random weight (flat spectrum) and a weight with
   decaying singular values (σ_k ∝ 1/k, as trained layers tend to have): ``lowrank:method=svd`` at ranks 4..128
   against its error, the error the cost model predicts from the spectrum, and time (the factorisation, done once per
   weight, timed apart); exact rows for reference, with what a built module caches (the fft weight spectrum) warm.

Method: ``torch.set_num_threads(--threads)``; one warm-up call of every lowering at a small size, then per row the
median of up to three timed calls (one when a call takes over a second), then one more call under ``torch.profiler``
with ``profile_memory``: the peak is the largest total of live torch allocations during the call, replaying its
allocation and free events in time order (the inputs, allocated before, do not count). Other processes on the
machine skew timings: the load average is recorded with the results.

    python bench/lowerings.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import math
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import write_result  # noqa: E402

from itnet_compiler.backends.torch import lowerings as L  # noqa: E402
from itnet_compiler.backends.torch.fused_conv import direct_form  # noqa: E402
from itnet_compiler.backends.torch.lowrank import LowRankOptions, fit_features  # noqa: E402
from itnet_compiler.backends.torch.lowrank_conv import ConvLowRankOptions, factorize  # noqa: E402
from itnet_compiler.backends.torch.runtime import RuntimeState  # noqa: E402
from itnet_compiler.ir.lowerings.stationary import svd_error  # noqa: E402


def peak_bytes(fn) -> int:
    """The largest total of live torch allocations during ``fn()`` beyond what was live before it, from the
    profiler's allocation and free events replayed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # An op's own allocations (not its children's) at its start, frees as [memory] events: replayed in order.
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def measure(fn):
    """(result, seconds, peak bytes): the median of up to 3 timed calls (1 when a call takes over a second), then
    one more call under the memory profiler."""
    times = []
    while len(times) < 3 and sum(times) < 1.0:
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), peak_bytes(fn)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def available_bytes() -> int:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024


# ---------------------------------------------------------------------------------------------- attention

D = 64
SCALE = D**-0.5
MC = {"samples": 256}
ATTENTION = {
    "dense": lambda q, k, v: L.attention_dense(q, k, v, scale=SCALE, causal=False, return_weights=False),
    "library (SDPA)": lambda q, k, v: L.attention_library(q, k, v, scale=SCALE, causal=False, return_weights=False),
    "fused": lambda q, k, v: L.attention_fused(q, k, v, scale=SCALE, causal=False, return_weights=False),
}
for _mode in ("per_row", "shared"):
    for _prop in ("uniform", "norm", "lowrank"):
        ATTENTION[f"montecarlo {_mode} {_prop} M=256"] = lambda q, k, v, m=_mode, p=_prop: L.attention_montecarlo(
            q, k, v, scale=SCALE, causal=False, return_weights=False, return_error=True, mode=m, proposal=p, **MC
        )
ATTENTION["montecarlo per_row norm M=1024"] = lambda q, k, v: L.attention_montecarlo(
    q, k, v, scale=SCALE, causal=False, return_weights=False, return_error=True, samples=1024, proposal="norm"
)
for _method in ("favor", "nystrom"):
    ATTENTION[f"lowrank {_method} r=256"] = lambda q, k, v, m=_method: L.attention_lowrank(
        q, k, v, scale=SCALE, causal=False, return_weights=False, method=m, rank=256
    )


def peaked(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, n, D, generator=g) * 5.0
    k = torch.randn(1, 1, n, D, generator=g)
    v = torch.randn(1, 1, n, D, generator=g)
    return q, k, v


def entropy(q, k, rows: int = 256) -> float:
    p = torch.softmax((q[..., :rows, :].double() @ k.double().transpose(-2, -1)) * SCALE, -1)
    return float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean())


def attention_rows(n: int) -> list[dict]:
    q, k, v = peaked(n)
    ref = L.attention_fused(q.double(), k.double(), v.double(), scale=SCALE, causal=False, return_weights=False)
    ent = entropy(q, k)
    rows = []
    dense_need = 3 * n * n * 4
    sdpa_secs = None
    for name, fn in ATTENTION.items():
        row: dict = {"N": n, "lowering": name, "entropy_nats": round(ent, 2)}
        if name == "dense" and dense_need > available_bytes() // 2:
            row["skipped"] = f"needs ~{dense_need / 2**30:.1f} GiB for its N×N temporaries"
            rows.append(row)
            continue
        out, secs, peak = measure(lambda fn=fn: fn(q, k, v))
        estimate = None
        if isinstance(out, tuple):
            out, est = out
            estimate = est.rel
        row.update(seconds=secs, peak_mib=peak / 2**20, rel_error=rel(out, ref), self_estimate=estimate)
        if name.startswith("library"):
            sdpa_secs = secs
        rows.append(row)
        del out
    lopts = LowRankOptions(method="learned", rank=256)
    fitted, fit_secs, _ = measure(lambda: fit_features(q, k, v, scale=SCALE, causal=False, opts=lopts))
    from itnet_compiler.backends.torch.lowrank import lowrank_transform
    from itnet_compiler.backends.torch.pairkernel import DotExpKernel

    def learned():
        kernel = DotExpKernel(q, k, None, scale=SCALE, causal=False)
        return lowrank_transform(kernel, v, lopts, fitted.features(kernel))

    out, secs, peak = measure(learned)
    rows.append(
        {
            "N": n,
            "lowering": "lowrank learned r=256",
            "entropy_nats": round(ent, 2),
            "seconds": secs,
            "fit_seconds": fit_secs,
            "peak_mib": peak / 2**20,
            "rel_error": rel(out, ref),
            "self_estimate": None,
        }
    )
    for row in rows:
        if sdpa_secs and "seconds" in row:
            row["x_sdpa"] = row["seconds"] / sdpa_secs
    return rows


# ---------------------------------------------------------------------------------------------- convolution

CONV = dict(
    stride=(1, 1),
    padding=((1, 1), (1, 1)),
    dilation=(1, 1),
    groups=1,
    transposed=False,
    output_padding=(0, 0),
    padding_mode="zeros",
)


def conv_weight(c: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, 3, 3, generator=g) / math.sqrt(9 * c)
    if kind == "random":
        return w
    u, _, vh = torch.linalg.svd(w.reshape(c, -1), full_matrices=False)
    sigma = 1.0 / torch.arange(1, u.shape[1] + 1, dtype=w.dtype)
    return ((u * sigma) @ vh).reshape_as(w)


def conv_rows(c: int, size: int, ranks: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, c, size, size, generator=g)
    rows = []
    for kind in ("random", "decaying"):
        w = conv_weight(c, kind)
        ref = L.conv_library(x.double(), w.double(), None, **CONV)
        base = None
        for name, fn in (("library", L.conv_library), ("fused", L.conv_fused), ("fft", L.conv_fft)):
            with RuntimeState():  # as in a built module: the weight spectrum of fft is computed once, then reused
                fn(x, w, None, **CONV)
                out, secs, peak = measure(lambda fn=fn: fn(x, w, None, **CONV))
            base = base or secs
            rows.append(dict(weight=kind, lowering=name, seconds=secs, peak_mib=peak / 2**20, rel_error=rel(out, ref)))
        predicted = svd_error(w, 1, False)
        dc = direct_form(x, w, **CONV)
        for r in ranks:
            opts = ConvLowRankOptions(method="svd", rank=r)
            chain, fsecs, _ = measure(lambda opts=opts: factorize(dc, opts))
            out, secs, peak = measure(lambda chain=chain: chain(dc.x))
            rows.append(
                dict(
                    weight=kind,
                    lowering=f"lowrank svd r={r}",
                    seconds=secs,
                    factor_seconds=fsecs,
                    peak_mib=peak / 2**20,
                    rel_error=rel(out, ref),
                    predicted_error=predicted[r - 1],
                )
            )
        for row in rows:
            if row["weight"] == kind:
                row["x_library"] = row["seconds"] / base
    return rows


# ---------------------------------------------------------------------------------------------- output


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_attention(rows: list[dict]) -> None:
    print(f"{'N':>6} {'lowering':<34} {'time s':>8} {'x SDPA':>7} {'peak MiB':>9} {'rel err':>9} {'self-est':>9}")
    shown = set()
    for r in rows:
        if r["N"] not in shown:
            shown.add(r["N"])
            print(f"{r['N']:>6} (mean row entropy {r['entropy_nats']:.2f} nats)")
        if "skipped" in r:
            print(f"{r['N']:>6} {r['lowering']:<34} skipped: {r['skipped']}")
            continue
        extra = f"  (+ fit {r['fit_seconds']:.2f} s)" if "fit_seconds" in r else ""
        print(
            f"{r['N']:>6} {r['lowering']:<34} {r['seconds']:>8.3f} {_fmt(r.get('x_sdpa'), '7.2f'):>7} "
            f"{r['peak_mib']:>9.1f} {r['rel_error']:>9.2e} {_fmt(r['self_estimate'], '9.2e'):>9}{extra}"
        )


def print_conv(rows: list[dict]) -> None:
    print(f"{'weight':<9} {'lowering':<18} {'time s':>8} {'x lib':>6} {'peak MiB':>9} {'rel err':>9} {'predicted':>9}")
    for r in rows:
        print(
            f"{r['weight']:<9} {r['lowering']:<18} {r['seconds']:>8.4f} {r['x_library']:>6.2f} {r['peak_mib']:>9.1f} "
            f"{r['rel_error']:>9.2e} {_fmt(r.get('predicted_error'), '9.2e'):>9}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script (writes *.quick.json)")
    ap.add_argument("--threads", type=int, default=2)
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    sizes = [512, 2048] if ns.quick else [2048, 8192, 32768]
    conv = (32, 32, [4, 8, 16, 32]) if ns.quick else (128, 64, [4, 8, 16, 32, 64, 128])
    q, k, v = peaked(256)
    for fn in ATTENTION.values():  # warm-up: first calls load kernels and allocate thread pools
        fn(q, k, v)
    attention = []
    for n in sizes:
        print(f"attention N={n} ...", file=sys.stderr, flush=True)
        attention += attention_rows(n)
    print(f"\ndot_exp, 1 head, d={D}, peaked inputs, {ns.threads} threads; error against an exact float64 reference")
    print_attention(attention)
    convs = conv_rows(*conv)
    print(f"\nConv2d {conv[0]}->{conv[0]} 3x3 on 1x{conv[0]}x{conv[1]}x{conv[1]}; predicted = SVD truncation error")
    print_conv(convs)
    payload = {"threads": ns.threads, "attention": attention, "conv": convs}
    path = write_result("lowerings", payload, ns.quick)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
