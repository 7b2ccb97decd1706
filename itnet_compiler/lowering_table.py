"""What ``itnet lowerings`` prints: every family's lowerings, their options (type, default, range, tune space) and
the targets that run each (natively, or handed to torch by design), from the registry and the target records."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from .ir.fields import describe
from .ir.lowering import Lowering, lowerings
from .ir.target import TARGETS, ensure_loaded


def where(rec: Lowering) -> list[str]:
    """Targets that run ``rec``: a name, or ``name (on torch)`` for a target that hands it to torch by design."""
    out = []
    for t in TARGETS.values():
        if t.native(rec.family, rec.name):
            out.append(t.name)
        elif t.delegated(rec.family, rec.name):
            out.append(f"{t.name} (on {TARGETS[t.delegate_to or ''].backend})")
    return out


def _bounds(row: dict[str, object]) -> str:
    if row["choices"]:
        return " | ".join(map(str, row["choices"]))  # type: ignore[arg-type]
    rng = row["range"]
    if rng:
        lo, hi = rng  # type: ignore[misc]
        return f"[{_num(lo)}, {_num(hi)}]"
    return ""


def _num(v: object) -> str:
    if isinstance(v, int) and v >= 2**31 - 1:
        return "2^31-1"
    if isinstance(v, float) and math.isfinite(v) and v == int(v) and abs(v) >= 1 << 20:
        return f"2^{int(math.log2(v))}" if v == 2 ** round(math.log2(v)) else f"{v:g}"
    return str(v)


def as_records(family: str | None = None) -> list[dict[str, object]]:
    """The registry as plain data (``itnet lowerings --json``)."""
    ensure_loaded()
    out = []
    for rec in lowerings(family):
        tiles = {t.name: sorted(t.tiles(rec.family, rec.name)) for t in TARGETS.values()
                 if t.can_run(rec.family, rec.name) and t.tiles(rec.family, rec.name)}  # fmt: skip
        out.append(
            {
                "family": rec.family,
                "lowering": rec.name,
                "exact": rec.exact,
                "doc": rec.doc,
                "error_model": rec.error_model,
                "cost_rule": rec.cost is not None,
                "targets": where(rec),
                "options": [
                    {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}
                    for row in describe(rec.options)
                ],  # fmt: skip
                "tiles": tiles,
            }
        )
    return out


def print_lowerings(console: Console, family: str | None = None) -> None:
    ensure_loaded()
    families = list(dict.fromkeys(r.family for r in lowerings(family)))
    for fam in families:
        table = Table(title=f"family {fam}", title_justify="left", expand=False)
        for col in ("lowering", "exact", "targets", "what it does"):
            table.add_column(col)
        for rec in lowerings(fam):
            table.add_row(rec.name, "yes" if rec.exact else "no", ", ".join(where(rec)) or "none", rec.doc)
        console.print(table)
        for rec in lowerings(fam):
            rows = describe(rec.options)
            tiles = {t.name: sorted(t.runs.get((fam, rec.name), ())) for t in TARGETS.values()}
            tiles = {k: v for k, v in tiles.items() if v}
            if not rows and not tiles and rec.exact:
                continue
            console.print(f"  {fam} {rec.name}" + ("" if rec.exact else f": error model {rec.error_model or '?'}"))
            if rows:
                opts = Table(show_edge=False, pad_edge=False, box=None)
                for col in ("option", "type", "default", "range", "tuner searches", "meaning"):
                    opts.add_column(col)
                for row in rows:
                    tune = row["tune"]
                    tune_text = "" if tune is None else " | ".join(map(str, tune)) if isinstance(tune[0], str) \
                        else f"{tune[0]}..{tune[1]}"  # type: ignore[index]  # fmt: skip
                    opts.add_row(f"  {row['name']}", str(row["type"]), _num(row["default"]), _bounds(row), tune_text,
                                 str(row["doc"]))  # fmt: skip
                console.print(opts)
            for tname, names in tiles.items():
                console.print(f"    tiles read by {tname}: {', '.join(names)} (integers >= 1)")
        console.print()
