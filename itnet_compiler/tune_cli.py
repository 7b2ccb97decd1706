"""``itnet tune``: the tuner from the command line, with a live progress bar, a summary table and an HTML report.

    itnet tune m.itir --budget 1e-2 [--backend torch|triton|TARGET] [--calib N | --calib-data F ...]
                      [--held-out N | --held-out-data F ...] [--input NAME:SHAPE:DTYPE ...] [--seed S]
                      [--time-limit S] [--repeat R] -o plan.json [--report report.html] [--retune]

Random calibration batches use seeds ``S, S+1, ...`` and random held-out batches ``S+1000, ...``, so the plan is
checked on inputs it was not tuned on. Without ``--retune``, a current plan already at ``-o`` (same program, device,
versions, budget and sizes) is kept and shown instead of tuned again.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import sys
import time
import warnings
from pathlib import Path

from . import cli, config
from .errors import ItnetError
from .ir.core import Program
from .plan import Plan
from .tuner import tune

HELD_OUT_SEED = 1000


def cmd_tune(ns: argparse.Namespace) -> int:
    if not (ns.budget >= 0 and math.isfinite(ns.budget)):
        raise ItnetError(f"--budget {ns.budget}: give a relative error ≥ 0, e.g. 1e-2 for 1 %")
    if ns.calib < 1 or ns.held_out < 0 or ns.repeat < 1:
        raise ItnetError("--calib and --repeat take at least 1, --held-out at least 0")
    prog = cli._load_bundle(ns.bundle)
    calib = [_batch(prog, cli._data_inputs(prog, f), f) for f in ns.calib_data] or [
        _batch(prog, cli._run_inputs(prog, ns.input, ns.seed + i), "random inputs") for i in range(ns.calib)
    ]
    held = [_batch(prog, cli._data_inputs(prog, f), f) for f in ns.held_out_data] or [
        _batch(prog, cli._run_inputs(prog, ns.input, ns.seed + HELD_OUT_SEED + i), "random inputs")
        for i in range(ns.held_out)
    ]
    out = Path(ns.output)
    if not ns.retune and Plan.is_tuned(out):
        old = Plan.load(out)
        why = old.stale(prog, ns.backend)
        if why is None and old.budget == ns.budget and old.sizes == _sizes(prog, calib[0]):
            print(f"{out} is a current plan for {ns.bundle} at budget {ns.budget:g}; --retune tunes again")
            print_summary(old)
            return 0
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=config.debug_level() == 0), _Bar() as bar:
        plan = cli._guarded(
            lambda: tune(
                prog,
                calib,
                ns.budget,
                ns.backend,
                ns.time_limit,
                held or None,
                ns.repeat,
                bar.update,
                ns.keep,
                ns.per_layer,
            ),  # fmt: skip
            "tuning the program",
        )
    plan.save(out)
    print(f"tuned {ns.bundle} in {time.perf_counter() - t0:.1f}s -> {out}")
    print_summary(plan)
    if ns.report:
        write_report(plan, ns.report, str(ns.bundle))
        print(f"report: {ns.report}")
    return 0


def _batch(prog: Program, inputs: tuple[tuple, dict], where: str) -> object:
    args, kwargs = inputs
    if args and kwargs:
        raise ItnetError(f"{where}: tune takes positional or keyword inputs, not both; this program takes both")
    return dict(kwargs) if kwargs else tuple(args)


def _sizes(prog: Program, batch: object) -> dict[str, int]:
    from .tuner import _sizes as sizes_of

    return sizes_of(prog, batch)


class _Bar:
    """A rich progress bar over the tuner's steps (layer × candidate, then the end-to-end checks), with an ETA."""

    def __enter__(self) -> _Bar:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = Console(file=sys.stderr, markup=False, highlight=False, emoji=False)
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.progress.__enter__()
        self.task = self.progress.add_task("tuning", total=None)
        return self

    def update(self, layer: str, what: str, done: int, total: int) -> None:
        where = f"{layer}: " if layer else ""
        self.progress.update(self.task, completed=done, total=total, description=f"{where}{what}"[:60])

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


# ---------------------------------------------------------------------------------------------- the summary


def summary_rows(plan: Plan) -> list[dict]:
    """Per layer: exact and chosen lowerings, their measured times, the time saved and the chosen one's errors."""
    rows = []
    for layer, m in plan.measurements.items():
        chosen = next((r for r in m.get("candidates", []) if r["spec"] == m["chosen"]), {})
        t_exact, t_chosen = m.get("exact_seconds"), m.get("chosen_seconds")
        saved = t_exact - t_chosen if isinstance(t_exact, float) and isinstance(t_chosen, float) else None
        rows.append({
            "layer": layer,
            "exact": m["exact"],
            "chosen": m["chosen"],
            "exact_seconds": t_exact,
            "chosen_seconds": t_chosen,
            "saved_seconds": saved,
            "error": chosen.get("error"),
            "estimate": chosen.get("estimate"),
            "end_to_end": chosen.get("end_to_end", 0.0 if m["chosen"] == m["exact"] else None),
        })  # fmt: skip
    return rows


def print_summary(plan: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    width = None if sys.stdout.isatty() else 200
    console = Console(file=sys.stdout, width=width, markup=False, highlight=False, emoji=False)
    table = Table(title=f"plan at budget {plan.budget:g} on {plan.device} ({plan.backend})")
    for col in ("layer", "exact", "chosen", "exact ms", "chosen ms", "saved ms", "layer error", "estimate",
                "end-to-end alone"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("layer", "exact", "chosen") else "right")
    for r in summary_rows(plan):
        table.add_row(
            r["layer"], r["exact"], r["chosen"], _ms(r["exact_seconds"]), _ms(r["chosen_seconds"]),
            _ms(r["saved_seconds"]), _g(r["error"]), _g(r["estimate"]), _g(r["end_to_end"]),
        )  # fmt: skip
    console.print(table)
    e = plan.end_to_end
    if e:
        ratio = e["seconds"] / e["exact_seconds"] if e.get("exact_seconds") else math.nan
        where = "held-out" if e.get("held_out") else "calibration"
        console.print(
            f"end to end: {_ms(e['seconds'])} ms vs {_ms(e['exact_seconds'])} ms exact ({ratio:.2f}×), "
            f"{where} error {e['error']:.3g} (budget {plan.budget:g}); tuned in {e.get('tuning_seconds', 0):.1f}s"
        )
    for note in plan.notes:
        console.print(f"note: {note}")


def _ms(x: object) -> str:
    return f"{1000 * x:.2f}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _g(x: object) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


# ---------------------------------------------------------------------------------------------- the report


def write_report(plan: Plan, path: str | Path, title: str = "itnet plan") -> None:
    """One HTML file: per layer, error against time for every candidate (the chosen one marked), the end-to-end
    figure, and the measurements as tables; pictures embedded, so the file stands alone."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}</style></head><body>",
        f"<h1>{html.escape(title)}: plan at budget {plan.budget:g}</h1>",
        f"<p>{html.escape(plan.device)}, backend {html.escape(plan.backend)}, sizes "
        f"{html.escape(str(plan.sizes))}, versions {html.escape(str(plan.versions))}</p>",
        "<h2>End to end</h2>",
        _img(_end_to_end_figure(plan)),
        _table(
            [
                "layer",
                "exact",
                "chosen",
                "exact ms",
                "chosen ms",
                "saved ms",
                "layer error",
                "estimate",
                "end-to-end alone",
            ],  # fmt: skip
            [
                [
                    r["layer"],
                    r["exact"],
                    r["chosen"],
                    _ms(r["exact_seconds"]),
                    _ms(r["chosen_seconds"]),
                    _ms(r["saved_seconds"]),
                    _g(r["error"]),
                    _g(r["estimate"]),
                    _g(r["end_to_end"]),
                ]
                for r in summary_rows(plan)
            ],
        ),  # fmt: skip
    ]
    parts += [f"<p>note: {html.escape(n)}</p>" for n in plan.notes]
    for layer, m in plan.measurements.items():
        cands = m.get("candidates", [])
        parts.append(f"<h2>{html.escape(layer)}</h2>")
        if not cands:
            parts.append("<p>not measured</p>")
            continue
        parts.append(_img(_layer_figure(layer, cands, m["chosen"], plan.budget)))
        parts.append(
            _table(["spec", "exact", "ms", "spread", "error", "estimate", "end-to-end alone", "failed"],
                   [[r["spec"], "yes" if r["exact"] else "", _ms(r["seconds"]), _g(r.get("spread")), _g(r["error"]),
                     _g(r.get("estimate")), _g(r.get("end_to_end")), r.get("failed", "")] for r in cands])
        )  # fmt: skip
    parts.append("</body></html>")
    Path(path).write_text("\n".join(parts) + "\n")


def _table(head: list[str], rows: list[list[object]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _img(fig: object) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f"<p><img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'></p>"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _layer_figure(layer: str, cands: list[dict], chosen: str, budget: float) -> object:
    plt = _pyplot()
    ok = [r for r in cands if math.isfinite(r["seconds"]) and math.isfinite(r["error"])]
    floor = min([r["error"] for r in ok if r["error"] > 0] + [1e-8]) / 10  # exact errors drawn at a floor
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for exact, color, label in ((True, "tab:blue", "exact"), (False, "tab:orange", "approximate")):
        pts = [r for r in ok if r["exact"] == exact]
        ax.scatter([1000 * r["seconds"] for r in pts], [max(r["error"], floor) for r in pts], c=color, label=label)
    for r in ok:
        if r["spec"] == chosen:
            ax.scatter([1000 * r["seconds"]], [max(r["error"], floor)], s=260, marker="*", c="tab:red",
                       label=f"chosen: {chosen}", zorder=3)  # fmt: skip
    if budget > 0:
        ax.axhline(budget, ls="--", c="gray", lw=1, label=f"budget {budget:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("time per calibration pass (ms)")
    ax.set_ylabel("layer's relative error")
    ax.set_title(layer, fontsize=10)
    ax.legend(fontsize=7)
    return fig


def _end_to_end_figure(plan: Plan) -> object:
    plt = _pyplot()
    e = plan.end_to_end
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    a.bar(["exact", "tuned"], [1000 * e.get("exact_seconds", 0), 1000 * e.get("seconds", 0)],
          color=["tab:blue", "tab:red"])  # fmt: skip
    a.set_ylabel("ms per pass (held-out inputs)")
    b.bar(["error", "budget"], [e.get("error", 0), plan.budget], color=["tab:red", "gray"])
    b.set_ylabel("end-to-end relative error")
    fig.suptitle("the whole model", fontsize=10)
    return fig


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``itnet tune`` on the CLI's sub-parsers."""
    p = sub.add_parser("tune", help="per layer, the fastest lowering within an accuracy budget; writes a plan")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--budget", type=float, default=1e-2, help="end-to-end relative error allowed (default 1e-2)")
    p.add_argument("--backend", choices=("torch", "triton", "torch-cpu", "torch-cuda"), default="torch")
    p.add_argument("--calib", type=int, default=2, help="random calibration batches (default 2)")
    p.add_argument("--calib-data", action="append", default=[], metavar="FILE",
                   help="a safetensors batch (one tensor per input); repeat for more (instead of --calib)")  # fmt: skip
    p.add_argument("--held-out", type=int, default=1, help="random held-out batches for the final check (default 1)")
    p.add_argument("--held-out-data", action="append", default=[], metavar="FILE",
                   help="a safetensors held-out batch; repeat for more (instead of --held-out)")  # fmt: skip
    p.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE:DTYPE",
                   help="shape of the random batches (default: the example sizes)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the first random calibration batch")
    p.add_argument("--time-limit", type=float, default=None, help="seconds of measuring before planning with what ran")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per candidate after one warm-up (default 5)")
    p.add_argument("--keep", type=int, default=16, help="approximations measured per layer (default 16)")
    p.add_argument("--per-layer", type=int, default=4,
                   help="approximations per layer checked end to end (default 4)")  # fmt: skip
    p.add_argument("-o", "--output", required=True, help="plan file to write (JSON)")
    p.add_argument("--report", metavar="FILE.html", help="also write an HTML report with one picture per layer")
    p.add_argument("--retune", action="store_true", help="tune even when -o already holds a current plan")
    p.set_defaults(func=cmd_tune)
