"""Long fuzz run on demand (issue #9): mutated printed programs through parse → verify → build → forward.

Text i of a run is a function of (seed, i) alone (``tests/fuzzing.py``: 1-3 mutations of one seed program), so any
text of a report can be regenerated with ``--show I``. Every text runs in a forked worker that is killed after
``--limit`` seconds, so a hang is counted, not fatal. The contract: each text succeeds or fails with one clean
``ItnetError`` line; anything else is a finding, grouped by (kind, stage, exception type, message with numbers and
names elided), each group with the shortest text that showed it, minimised line by line (``--no-minimise`` skips
that). Results go to ``bench/results/fuzz.json`` (``--out``).

    python bench/fuzz.py --texts N [--seed S] [--workers W] [--limit 5] [--out bench/results/fuzz.json]
    python bench/fuzz.py --seed S --show I          # print text I of seed S
    python bench/fuzz.py --replay FILE              # run one text file through the worker and print its outcome
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import queue
import random
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fuzzing  # noqa: E402
from _common import RESULTS, machine_info  # noqa: E402

SNIPPET = 4000  # characters of an example text kept in the JSON


def safe(line: str) -> str:
    """A line any terminal can print (texts hold lone surrogates and control characters)."""
    return line.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x1b", "\\x1b")


def generate(seeds: dict[str, str], seed: int, i: int, most: int) -> tuple[str, list[str], str]:
    return fuzzing.mutate(fuzzing.RandomChooser(random.Random(f"{seed}:{i}")), seeds, most=most)


def changed_lines(seed_text: str, text: str, limit: int = 6) -> list[str]:
    """The lines of ``text`` that are not in its seed (each cut to 300 characters)."""
    diff = difflib.unified_diff(seed_text.split("\n"), text.split("\n"), lineterm="", n=0)
    out = [ln for ln in diff if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    return [ln if len(ln) <= 300 else ln[:300] + f"… ({len(ln)} chars)" for ln in out[:limit]]


def minimise(worker: fuzzing.Worker, text: str, key: tuple, budget: float = 60.0) -> str:
    """Drop line chunks (halving their size) while the outcome keeps the same group key."""
    lines = text.split("\n")
    deadline = time.monotonic() + budget
    chunk = max(len(lines) // 2, 1)
    while chunk >= 1 and time.monotonic() < deadline:
        i, removed = 0, False
        while i < len(lines) and time.monotonic() < deadline:
            trial = lines[:i] + lines[i + chunk :]
            if trial and worker.run("\n".join(trial)).key() == key:
                lines, removed = trial, True
            else:
                i += chunk
        if not removed:
            chunk //= 2
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--limit", type=float, default=fuzzing.TIME_LIMIT, help="seconds per text")
    ap.add_argument("--most", type=int, default=3, help="mutations per text, at most")
    ap.add_argument("--out", type=Path, default=RESULTS / "fuzz.json")
    ap.add_argument("--no-minimise", action="store_true")
    ap.add_argument("--show", type=int, help="print text SHOW of --seed and exit")
    ap.add_argument("--replay", type=Path, help="run one text file and print its outcome")
    args = ap.parse_args()

    seeds = fuzzing.load_seeds()
    if args.show is not None:
        name, kinds, text = generate(seeds, args.seed, args.show, args.most)
        print(f"# seed {name}, mutations {kinds}", file=sys.stderr)
        sys.stdout.write(text)
        return
    warm = fuzzing.warm(seeds)
    bad_seeds = {n: o for n, o in warm.items() if o.status != "ok"}
    if bad_seeds:
        print(f"warning: seeds that do not run cleanly: {bad_seeds}", file=sys.stderr)
    if args.replay is not None:
        worker = fuzzing.Worker(args.limit)
        print(worker.run(args.replay.read_text()))
        worker.close()
        return

    workers: queue.Queue[fuzzing.Worker] = queue.Queue()
    for _ in range(args.workers):
        w = fuzzing.Worker(args.limit)
        w.run(seeds[min(seeds)])  # forked now, before any thread of the pool exists
        workers.put(w)
    counts: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {k: Counter() for k in fuzzing.MUTATIONS}
    groups: dict[tuple, dict] = {}
    clean_stages: Counter[str] = Counter()
    start = time.monotonic()

    def one(i: int) -> None:
        name, kinds, text = generate(seeds, args.seed, i, args.most)
        worker = workers.get()
        try:
            out = worker.run(text)
            if out.status == "hang":  # confirm on a fresh worker: a loaded machine can make a slow text look hung
                again = worker.run(text)
                if again.status != "hang":
                    counts["unconfirmed_hang"] += 1
                    out = again
        finally:
            workers.put(worker)
        status = "canary" if out.canary else out.status
        if status == "ok":
            status = "ok_forward" if out.stage == "forward" else "ok_build_only"
        counts[status] += 1
        if status == "itnet_error":
            clean_stages[out.stage] += 1
        for k in set(kinds):
            by_kind[k]["clean" if out.clean else "finding"] += 1
        if out.clean:
            return
        g = groups.setdefault(out.key(), {"count": 0, "seeds": Counter(), "kinds": Counter(), "outcome": out})
        g["count"] += 1
        g["seeds"][name] += 1
        g["kinds"].update(set(kinds))
        if "text" not in g or len(text) < len(g["text"]):
            g.update(text=text, index=i, seed=name, mutations=kinds, outcome=out)

    done = 0
    with ThreadPoolExecutor(args.workers) as pool:
        for _ in pool.map(one, range(args.texts)):
            done += 1
            if done % 500 == 0:
                print(f"{done}/{args.texts} texts, {time.monotonic() - start:.0f} s, {dict(counts)}", file=sys.stderr)
    elapsed = time.monotonic() - start

    ordered = sorted(groups.items(), key=lambda kv: -kv[1]["count"])

    def minimise_group(item: tuple[tuple, dict]) -> None:
        key, g = item
        g["minimal"] = g["text"]
        if args.no_minimise or key[0] in ("hang", "crash"):
            return
        worker = workers.get()
        try:
            g["minimal"] = minimise(worker, g["text"], key)
        finally:
            workers.put(worker)

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(minimise_group, ordered))
    while not workers.empty():
        workers.get().close()

    report = []
    for key, g in ordered:
        out: fuzzing.Outcome = g["outcome"]
        minimal = g["minimal"]
        report.append(
            {
                "kind": key[0],
                "stage": key[1],
                "exception": key[2],
                "message": (out.message.splitlines() or [""])[0][:500],
                "multi_line_message": len(out.message.splitlines()) > 1,
                "canary": out.canary,
                "count": g["count"],
                "seeds": dict(g["seeds"].most_common()),
                "mutations": dict(g["kinds"].most_common()),
                "example": {
                    "index": g["index"],
                    "seed": g["seed"],
                    "mutations": g["mutations"],
                    "regenerate": f"python bench/fuzz.py --seed {args.seed} --most {args.most} --show {g['index']}",
                    "changed_lines": changed_lines(seeds[g["seed"]], g["text"]),
                    "minimal_text": minimal if len(minimal) <= SNIPPET else minimal[:SNIPPET] + "…",
                    "minimal_chars": len(minimal),
                },
            }
        )
    findings = sum(g["count"] for g in groups.values())
    payload = {
        "benchmark": "fuzz",
        "texts": args.texts,
        "seed": args.seed,
        "workers": args.workers,
        "time_limit_s": args.limit,
        "most_mutations": args.most,
        "seconds": round(elapsed, 1),
        "counts": {
            "clean_success_forward": counts["ok_forward"],
            "clean_success_build_only": counts["ok_build_only"],
            "clean_itnet_error": counts["itnet_error"],
            "bad_message": counts["bad_message"],
            "other_exception": counts["exception"],
            "hang": counts["hang"],
            "unconfirmed_hang": counts["unconfirmed_hang"],
            "crash": counts["crash"],
            "canary": counts["canary"],
            "harness_error": counts["harness"],
            "findings": findings,
        },
        "clean_itnet_error_by_stage": dict(clean_stages.most_common()),
        "by_mutation": {k: dict(v) for k, v in by_kind.items()},
        "groups": report,
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, ensure_ascii=True) + "\n")

    c = payload["counts"]
    print(
        f"{args.texts} texts in {elapsed:.0f} s: {c['clean_success_forward']} ran, {c['clean_success_build_only']} "
        f"built (no inputs at their sizes), {c['clean_itnet_error']} clean ItnetErrors; findings: "
        f"{c['other_exception']} other exceptions, {c['bad_message']} bad messages, {c['hang']} hangs, "
        f"{c['crash']} crashes, {c['canary']} canary hits, {c['harness_error']} harness errors"
    )
    print(f"clean ItnetErrors by stage: {dict(clean_stages.most_common())}")
    for r in report:
        print(safe(f"{r['count']:6d}  {r['kind']:<11} {r['stage']:<8} {r['exception']:<22} {r['message'][:110]}"))
        for ln in r["example"]["changed_lines"][:2]:
            print(safe(f"{'':8}{ln[:150]}"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
