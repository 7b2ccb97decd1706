"""CPU overhead of the built torch module (default plan) against eager PyTorch on small real models.

Models: a small BERT (transformers ``BertModel``: hidden 128, 2 layers, 4 heads, seq 64, batch 2, with an attention
mask) with HF's default SDPA attention and, as a second row, with HF's ``eager`` (matmul/softmax) attention; and a
tiny ``ResNetModel`` (basic blocks, widths 16-128) on a 2x3x64x64 image. All in eval mode under ``torch.no_grad()``.

Method: outputs are compared first (max abs difference over every output leaf). Then eager, the built module
(``itc.build(prog)``, i.e. ``ItnetModule`` with its input checks and output re-structuring) and the raw generated
``fx.GraphModule`` inside it are timed interleaved (round-robin, the order rotating each round) after a warmup, with
``torch.set_num_threads`` fixed, and the medians are compared. ``overhead %`` = itnet median / eager median - 1.
Target: at most 5 %.

    python bench/overhead.py [--quick] [--threads 1,2] [--iters N]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402
from _common import interleaved_wall_cpu, summary, write_result  # noqa: E402

import itnet_compiler as itc  # noqa: E402

TARGET_PCT = 5.0


def bert_case(attn: str):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        vocab_size=1000,
        max_position_embeddings=128,
        attn_implementation=attn,
    )
    model = BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=g)
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 48:] = 0  # a padded row, so the mask is not trivially all-ones
    return model, (ids,), {"attention_mask": mask}


def resnet_case():
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
    )
    model = ResNetModel(cfg).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return model, (x,), {}


CASES = {
    "bert-sdpa": lambda: bert_case("sdpa"),
    "bert-eager-attn": lambda: bert_case("eager"),
    "resnet-tiny": resnet_case,
}


def leaves(out: object) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def max_abs_diff(a: object, b: object) -> float:
    la, lb = leaves(a), leaves(b)
    if len(la) != len(lb):
        raise SystemExit(f"output structure differs: {len(la)} eager leaves vs {len(lb)} itnet leaves")
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(la, lb, strict=True))


def run_case(name: str, threads: int, iters: int, warmup: int) -> dict[str, object]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, args, kwargs = CASES[name]()
    prog = itc.convert(model, args, kwargs)
    mod = itc.build(prog, backend="torch").eval()
    lowerings = sorted({f"{n.family}:{n.lowering}" for n in mod.program.transforms})
    flat = pytree.tree_leaves((args, kwargs))
    with torch.no_grad():
        diff = max_abs_diff(model(*args, **kwargs), mod(*args, **kwargs))
        times, cpu = interleaved_wall_cpu(
            {
                "eager": lambda: model(*args, **kwargs),
                "itnet": lambda: mod(*args, **kwargs),
                "itnet_gm": lambda: mod.gm(*flat),
            },
            iters=iters,
            warmup=warmup,
        )
    stats = {k: summary(v) for k, v in times.items()}
    # paired: each round's itnet time over the same round's eager time, so slow drift of the machine cancels
    paired = statistics.median(i / e for i, e in zip(times["itnet"], times["eager"], strict=True))
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    eager = stats["eager"]["median_ms"]
    itnet = stats["itnet"]["median_ms"]
    gm = stats["itnet_gm"]["median_ms"]
    return {
        "case": name,
        "threads": threads,
        "transforms": len(prog.transforms),
        "lowerings": lowerings,
        "max_abs_diff": diff,
        "eager_ms": eager,
        "itnet_ms": itnet,
        "itnet_gm_ms": gm,
        "overhead_pct": 100.0 * (itnet / eager - 1.0),
        "paired_overhead_pct": 100.0 * (paired - 1.0),
        "gm_overhead_pct": 100.0 * (gm / eager - 1.0),
        "cpu_eager_ms": cpu_med["eager"],
        "cpu_itnet_ms": cpu_med["itnet"],
        "cpu_itnet_gm_ms": cpu_med["itnet_gm"],
        "cpu_overhead_pct": 100.0 * (cpu_med["itnet"] / cpu_med["eager"] - 1.0),
        "wrapper_ms": itnet - gm,
        "meets_target": 100.0 * (itnet / eager - 1.0) <= TARGET_PCT,
        "stats": stats,
        "cpu_stats": {k: summary(v) for k, v in cpu.items()},
    }


def profile_case(name: str, threads: int, calls: int = 300, top: int = 15) -> None:
    """cProfile ``calls`` calls of the built module, to see where the time above eager goes."""
    torch.set_num_threads(threads)
    model, args, kwargs = CASES[name]()
    mod = itc.build(itc.convert(model, args, kwargs)).eval()
    with torch.no_grad():
        for _ in range(10):
            mod(*args, **kwargs)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            mod(*args, **kwargs)
        prof.disable()
    print(f"\n--- cProfile of itnet on {name}, {calls} calls, sorted by own time ---")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few iterations, one thread count: a smoke run")
    ap.add_argument("--threads", default=None, help="comma-separated torch thread counts (default 1,2; quick: 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed rounds per case (default 400; quick: 15)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    ap.add_argument("--profile", action="store_true", help="also cProfile the built module of every case that misses")
    opts = ap.parse_args()
    threads = [int(t) for t in (opts.threads or ("1" if opts.quick else "1,2")).split(",")]
    iters = opts.iters or (15 if opts.quick else 400)
    warmup = 3 if opts.quick else 40

    rows = []
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {iters} interleaved rounds after {warmup} warmup")
    print(
        f"{'case':<16} {'thr':>3} {'eager ms':>9} {'itnet ms':>9} {'overhead':>9} {'paired':>8} {'gm only':>8} "
        f"{'cpu ovh':>8} {'max|diff|':>10} {'load':>5}"
    )
    for t in threads:
        for name in opts.cases.split(","):
            load = os.getloadavg()[0]
            r = run_case(name, t, iters, warmup)
            r["loadavg_1m_before"] = load
            rows.append(r)
            flag = "" if r["meets_target"] else f"  (target <= {TARGET_PCT:g} % missed)"
            print(
                f"{name:<16} {t:>3} {r['eager_ms']:>9.3f} {r['itnet_ms']:>9.3f} {r['overhead_pct']:>+8.1f}% "
                f"{r['paired_overhead_pct']:>+7.1f}% {r['gm_overhead_pct']:>+7.1f}% {r['cpu_overhead_pct']:>+7.1f}% "
                f"{r['max_abs_diff']:>10.2e} {load:>5.1f}{flag}"
            )
    print(
        "overhead: ratio of wall-time medians (the target); paired: median of per-round ratios; gm only: the generated "
        "GraphModule alone;\ncpu ovh: ratio of process-CPU-time medians (steadier when other processes load the box); "
        "load: 1-minute load average before the case"
    )
    path = write_result(
        "overhead",
        {"target": f"overhead <= {TARGET_PCT} %", "iters": iters, "warmup": warmup, "results": rows},
        opts.quick,
    )
    print(f"wrote {path}")
    if opts.profile:
        for name in sorted({(r["case"], r["threads"]) for r in rows if not r["meets_target"]}):
            profile_case(*name)


if __name__ == "__main__":
    main()
