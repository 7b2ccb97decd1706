"""Peak memory of one training step (forward + backward) of the ITNet layer's ``fused`` lowering against ``dense``,
over lengths N: fused must grow linearly in N, dense grows like N² (it holds every pair's hidden activations).

Layer: ``IntegralTransform(32, heads=2, hidden=16, support="causal")`` on u [1, N, 32], fp32; the step is
``layer(u).sum().backward()``. Each (lowering, N) runs in a fresh subprocess; the figure is the peak of c10's CPU
allocator during the step (torch.profiler's allocation events: exact for tensor memory, blind to libraries' own
scratch), with the step's time beside it. The growth column is peak(N) / peak(N / 2): about 2 is linear, 4 quadratic.

    python bench/itnet_memory.py [--quick] [--max-dense 1024]

Writes bench/results/itnet_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from attention_memory import _allocator_peak  # noqa: E402

MIB = 2**20


def child(lowering: str, n: int) -> dict[str, object]:
    from itnet_compiler.ir.lowering import LoweringSpec
    from itnet_compiler.nn import IntegralTransform

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = IntegralTransform(32, heads=2, hidden=16, support="causal")
    layer.kernel.lowering = LoweringSpec.parse(lowering)
    u = torch.randn(1, n, 32)

    def step():
        layer.zero_grad(set_to_none=True)
        layer(u).sum().backward()

    step()  # warm-up
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return {"lowering": lowering, "n": n, "peak_bytes": _allocator_peak(step), "seconds": seconds}


def measure(lowering: str, n: int) -> dict[str, object]:
    code = f"import sys; sys.path[:0] = {[str(Path(__file__).parent.parent), str(Path(__file__).parent)]!r}; " \
           f"import json, itnet_memory as m; print(json.dumps(m.child({lowering!r}, {n})))"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        return {"lowering": lowering, "n": n, "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N up to 1024")
    ap.add_argument("--max-dense", type=int, default=1024, help="longest N for dense (its memory grows like N²)")
    args = ap.parse_args()
    lengths = [256, 512, 1024] if args.quick else [256, 512, 1024, 2048, 4096]
    rows = []
    for lowering in ("fused", "dense"):
        prev = None
        for n in lengths:
            if lowering == "dense" and n > args.max_dense:
                continue
            r = measure(lowering, n)
            r["growth"] = r["peak_bytes"] / prev if prev and "peak_bytes" in r else None
            prev = r.get("peak_bytes")
            rows.append(r)
            growth = f"{r['growth']:.2f}" if r["growth"] else "-"
            peak = f"{r['peak_bytes'] / MIB:9.1f}" if "peak_bytes" in r else "  failed"
            print(f"{lowering:6s} N={n:5d}  peak {peak} MiB  growth {growth:>5s}  step {r.get('seconds', 0):.3f} s")
    fused = {r["n"]: r["peak_bytes"] for r in rows if r["lowering"] == "fused" and "peak_bytes" in r}
    dense = {r["n"]: r["peak_bytes"] for r in rows if r["lowering"] == "dense" and "peak_bytes" in r}
    common = sorted(set(fused) & set(dense))
    if common:
        n = common[-1]
        print(f"at N={n}: fused / dense peak = {fused[n] / dense[n]:.3f}")
    out = Path(__file__).parent / "results" / "itnet_memory.json"
    out.write_text(json.dumps({"benchmark": "itnet_memory", "machine": "cpu", "torch": torch.__version__,
                               "rows": rows}, indent=1))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
