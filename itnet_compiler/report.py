"""What ``itnet inspect`` prints: one row per ``it.transform`` and a count of every op that stayed generic.

Cost figures come from each family's own ``flops(node)`` (a sympy expression in the program's symbolic sizes), shown
simplified; ``--cost`` also evaluates them at the example sizes recorded in the bundle (see ``example_sizes``).
"""

from __future__ import annotations

from collections import Counter

import sympy
from rich.console import Console
from rich.table import Table

from .frontend.specs import example_size
from .ir.core import Node, Program


def example_sizes(prog: Program) -> dict[str, int]:
    """Symbol -> size: the example inputs' sizes stored by ``itnet convert``, else 16 moved into the symbol's range."""
    example = prog.meta.get("example")
    stored = example.get("sizes", {}) if isinstance(example, dict) else {}
    out: dict[str, int] = {}
    for name, (lo, hi) in prog.symbols.items():
        val = stored.get(name)
        out[name] = int(val) if isinstance(val, int) else example_size(lo, hi)
    return out


def flops_of(node: Node) -> sympy.Expr | None:
    try:
        return sympy.simplify(node.attrs.flops(node))
    except (NotImplementedError, ValueError, TypeError):
        return None


def _call(node: Node, method: str) -> str:
    try:
        return str(getattr(node.attrs, method)(node) if method != "params" else node.attrs.params())
    except (NotImplementedError, ValueError, TypeError):
        return "?"


def _at(expr: sympy.Expr | None, sizes: dict[str, int]) -> float | None:
    if expr is None:
        return None
    val = expr.subs({s: sizes[s.name] for s in expr.free_symbols if s.name in sizes})
    return float(val) if val.is_number else None


def human(n: float | None, unit: str = "FLOP") -> str:
    if n is None:
        return "?"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}"


def transform_table(prog: Program, cost: bool, sizes: dict[str, int]) -> Table:
    table = Table(title="it.transform", title_justify="left", show_lines=False)
    table.add_column("layer", no_wrap=True)
    for name in ("family", "domain", "support", "heads", "parameters", "FLOPs", "lowering"):
        table.add_column(name, overflow="fold")
    if cost:
        at = ", ".join(f"{k}={v}" for k, v in sorted(sizes.items()))
        table.add_column(f"FLOPs @ {at}" if at else "FLOPs (value)", justify="right")
        table.add_column("share", justify="right")
    flops = [flops_of(n) for n in prog.transforms]
    values = [_at(f, sizes) for f in flops]
    total = sum(v for v in values if v is not None)
    for node, f, v in zip(prog.transforms, flops, values, strict=True):
        row = [
            node.layer or node.outputs[0].name,
            node.family or "?",
            _call(node, "domain"),
            node.attrs.support,
            str(node.attrs.heads),
            _call(node, "params") or "-",
            "?" if f is None else str(f),
            node.lowering or "?",
        ]
        if cost:
            row += [human(v), "?" if v is None or not total else f"{100 * v / total:.1f}%"]
        table.add_row(*row)
    return table


def generic_table(counts: Counter[str]) -> Table:
    table = Table(title="generic ops", title_justify="left")
    table.add_column("op", no_wrap=True)
    table.add_column("count", justify="right")
    for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(op, str(n))
    return table


def print_inspect(prog: Program, console: Console, *, cost: bool = False) -> None:
    """The two tables and one totals line."""
    sizes = example_sizes(prog)
    if prog.symbols:
        ranges = ", ".join(
            f"{k} in [{lo}, {'inf' if hi is None else hi}]" for k, (lo, hi) in sorted(prog.symbols.items())
        )
        console.print(f"symbols: {ranges}")
    if prog.transforms:
        console.print(transform_table(prog, cost, sizes))
    else:
        console.print("no it.transform nodes: every op stayed generic")
    counts = Counter(n.op for n in prog.generic_nodes())
    if counts:
        console.print(generic_table(counts))
    families = Counter(n.family for n in prog.transforms)
    fam_text = ", ".join(f"{f} {n}" for f, n in sorted(families.items()))
    flops = [flops_of(n) for n in prog.transforms]
    total = sympy.simplify(sum(f for f in flops if f is not None)) if flops else sympy.Integer(0)
    line = (
        f"total: {len(prog.transforms)} transforms ({fam_text or 'none'}), "
        f"{sum(counts.values())} generic ops ({len(counts)} kinds), transform FLOPs {total}"
    )
    if cost:
        line += f" = {human(_at(total, sizes))} at the example sizes"
    console.print(line)
    fallbacks = prog.meta.get("fallbacks")
    if isinstance(fallbacks, dict) and isinstance(fallbacks.get("layers"), dict):
        layers = fallbacks["layers"]
        backend = fallbacks.get("backend", "triton")
        if not layers:
            console.print(f"last {backend} run: every transform ran its generated kernel")
        for layer, reason in sorted(layers.items()):
            console.print(f"fallback ({backend} run): {layer or '<root>'} ran on the torch backend: {reason}")
