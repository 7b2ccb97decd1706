"""``itnet bench``: latency, throughput and peak memory of a built program against its source model, eager and
``torch.compile``d, measured in one run on the same random inputs.

    itnet bench m.itir [--plan plan.json | --lowering 'glob=spec' ...] [--backward] [--backend torch|triton|TARGET]
                       [--source SPEC [--config cfg.json] | --trust-source] [--no-compile] [--repeat N]
                       [--input ...] [--seed N] [--device cpu|cuda] [--json out.json]

Rows: ``eager`` and ``torch.compile`` (only with ``--source`` or ``--trust-source``: rebuilding the model runs its
code, exactly as ``itnet run --check`` does), ``itnet`` (the exact plan) and ``itnet plan`` (with ``--plan`` or
``--lowering``). Ratios are against ``eager``, or against ``itnet`` when there is no source model.

``bench`` does the measuring, so that the tuner times what this command times: per callable and per pass
(``forward`` under ``no_grad``; ``forward+backward``: the sum of every floating output leaf, ``.backward()``,
gradients set to ``None`` before each call), one warm-up call, then ``repeat`` timed calls (wall clock on the CPU,
CUDA events on a GPU), then one more call under the memory probe: the most bytes allocated above the level at the
call's start (``torch.profiler`` allocation events on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU). The
probe runs apart from the timed calls because profiling slows the call it watches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from . import cli, config
from .api import build
from .errors import ItnetError, first_line
from .frontend import specs
from .ir.core import Program

FORWARD = "forward"
BACKWARD = "forward+backward"
CPU_MEMORY = (torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.MKLDNN, torch.autograd.DeviceType.IDEEP)
Inputs = object  # a tensor, a tuple of positional inputs, a dict of keyword inputs or an (args, kwargs) pair


# ---------------------------------------------------------------------------------------------- measuring


def bench(
    module_or_callables: dict[str, Callable[..., object]],
    inputs: Inputs,
    backward: bool = False,
    repeat: int = 10,
    baseline: str | None = None,
) -> list[dict]:
    """One row per (name, pass): median seconds, relative spread, throughput, peak bytes and ratios to ``baseline``
    (default: the first name). A callable that fails leaves its reason in the row's ``error`` and the others run."""
    args, kwargs = split_inputs(inputs)
    count, unit = work(args, kwargs)
    device = next((t.device for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), None)
    passes = (FORWARD, BACKWARD) if backward else (FORWARD,)
    rows = [
        _measure(name, fn, args, kwargs, mode, max(1, repeat), device) | {"work": count, "unit": unit}
        for mode in passes
        for name, fn in module_or_callables.items()
    ]
    base_name = baseline if baseline is not None else next(iter(module_or_callables), None)
    for row in rows:
        base = next((r for r in rows if r["name"] == base_name and r["mode"] == row["mode"]), None)
        row["throughput"] = count / row["seconds"] if row["seconds"] else None
        row["ratio"] = _ratio(row["seconds"], base and base["seconds"])
        row["memory_ratio"] = _ratio(row["peak_bytes"], base and base["peak_bytes"])
    return rows


def split_inputs(inputs: Inputs) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], tuple) and isinstance(inputs[1], dict):
        return inputs[0], dict(inputs[1])
    return (inputs if isinstance(inputs, tuple) else (inputs,)), {}


def work(args: tuple, kwargs: dict) -> tuple[int, str]:
    """What one call processes: B×L tokens where an input is [B, L] integer ids, else the first input's batch size."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    ids = next((t for t in tensors if t.dim() == 2 and not t.is_floating_point() and not t.is_complex()), None)
    if ids is not None and ids.dtype != torch.bool:
        return ids.shape[0] * ids.shape[1], "tokens"
    first = next((t for t in tensors if t.dim() >= 1), None)
    return (first.shape[0] if first is not None else 1), "examples"


def _measure(
    name: str, fn: Callable[..., object], args: tuple, kwargs: dict, mode: str, repeat: int, device: torch.device | None
) -> dict:
    row: dict[str, object] = {"name": name, "mode": mode, "seconds": None, "spread": None, "times": [],
                              "peak_bytes": None, "error": None}  # fmt: skip
    call = _backward_call(fn, args, kwargs) if mode == BACKWARD else _forward_call(fn, args, kwargs)
    try:
        call()  # warm-up: compilation, caches, lazily fitted factors
        times = _timed(call, repeat, device)
        row["peak_bytes"] = _peak_bytes(call, device)
    except Exception as e:  # a model that cannot run this pass is a row, not the end of the benchmark
        row["error"] = f"{type(e).__name__}: {first_line(e)}" if not isinstance(e, ItnetError) else str(e)
        return row
    med = statistics.median(times)
    row.update(seconds=med, spread=(max(times) - min(times)) / med if med > 0 else 0.0, times=times)
    return row


def _forward_call(fn: Callable[..., object], args: tuple, kwargs: dict) -> Callable[[], object]:
    def call() -> object:
        with torch.no_grad():
            return fn(*args, **kwargs)

    return call


def _backward_call(fn: Callable[..., object], args: tuple, kwargs: dict) -> Callable[[], object]:
    def call() -> object:
        if isinstance(fn, torch.nn.Module):
            fn.zero_grad(set_to_none=True)
        with torch.enable_grad():
            out = fn(*args, **kwargs)
            leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            floats = [t for t in leaves if t.is_floating_point() or t.is_complex()]
            if not floats:
                raise ItnetError("no floating output depends on a parameter that requires grad; nothing to backward")
            loss = sum(t.real.sum() if t.is_complex() else t.sum() for t in floats)
            loss.backward()
        return out

    return call


def _timed(call: Callable[[], object], repeat: int, device: torch.device | None) -> list[float]:
    if device is None or device.type != "cuda":
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
    torch.cuda.synchronize(device)
    for start, end in events:
        start.record()
        call()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1000.0 for start, end in events]


def _peak_bytes(call: Callable[[], object], device: torch.device | None) -> int:
    """The most bytes one call allocates above what was allocated when it started."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() in CPU_MEMORY:
            level += e.nbytes()
            peak = max(peak, level)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Kineto writes a line to file descriptor 2 as each profile starts and stops; keep it off the user's terminal."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream without a descriptor
        fd = 2
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            sys.stderr.flush()
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _ratio(x: object, base: object) -> float | None:
    if not isinstance(x, (int, float)) or not isinstance(base, (int, float)) or base <= 0:
        return None
    return x / base


# ---------------------------------------------------------------------------------------------- the command


def cmd_bench(ns: argparse.Namespace) -> int:
    if ns.repeat < 1:
        raise ItnetError(f"--repeat {ns.repeat}: give at least one timed call")
    prog = cli._load_bundle(ns.bundle)
    source = cli._check_source(ns, prog) if ns.source is not None or ns.trust_source else None
    plan = cli._plan(ns)
    device = _device(ns.device)
    args, kwargs = cli._run_inputs(prog, ns.input, ns.seed, plan)
    args, kwargs = pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, (args, kwargs))
    models: dict[str, Callable[..., object]] = {}
    notes: dict[str, str] = {}
    if source is not None:
        eager = _source_model(prog, source).to(device)
        models["eager"] = eager
        if not ns.no_compile:
            models["torch.compile"] = torch.compile(eager)
    for name, p in (("itnet", None), ("itnet plan", plan)):
        if name == "itnet plan" and not plan:
            continue
        module = cli._guarded(lambda p=p: build(prog, backend=ns.backend, plan=p), f"building {name}").to(device)
        models[name] = module
        notes[name] = _lowerings(module.program)
    with warnings.catch_warnings(record=config.debug_level() == 0):
        rows = bench(models, (args, kwargs), backward=ns.backward, repeat=ns.repeat)
    for row in rows:
        row["note"] = row["error"] or notes.get(row["name"], "")
        if row["error"] and row["name"] != "torch.compile":
            raise ItnetError(f"{row['name']} {row['mode']} failed ({row['error']}); check the --input shapes")
    _print_table(ns.bundle, rows, next(iter(models)), device)
    if ns.json:
        report = {
            "bundle": str(ns.bundle),
            "backend": ns.backend,
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "repeat": ns.repeat,
            "inputs": {
                k: _shape(v) for k, v in zip([v.name for v in prog.inputs], _leaves(args, kwargs), strict=False)
            },
            "baseline": next(iter(models)),
            "rows": rows,
        }
        Path(ns.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ItnetError("--device cuda: torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def _source_model(prog: Program, source: specs.Source) -> torch.nn.Module:
    """The source model rebuilt as ``itnet run --check`` rebuilds it, holding the program's weights."""
    with warnings.catch_warnings(record=config.debug_level() == 0):
        model = cli._guarded(lambda: specs.load_source(source).model, f"rebuilding the source model {source.spec}")
    state = model.state_dict()
    same = {k: t for k, t in prog.tensors.items() if k in state and state[k].shape == t.shape}
    model.load_state_dict(same, strict=False)
    return model


def _lowerings(prog: Program) -> str:
    counts = Counter(n.lowering for n in prog.transforms)
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no transforms"


def _leaves(args: tuple, kwargs: dict) -> list[object]:
    return pytree.tree_leaves((args, kwargs))


def _shape(x: object) -> object:
    return list(x.shape) if isinstance(x, torch.Tensor) else x


def _print_table(bundle: str, rows: list[dict], baseline: str, device: torch.device) -> None:
    from rich.console import Console
    from rich.table import Table

    width = None if sys.stdout.isatty() else 200
    console = Console(file=sys.stdout, width=width, markup=False, highlight=False, emoji=False)
    unit = rows[0]["unit"] if rows else "examples"
    table = Table(title=f"{bundle} on {device} ({rows[0]['work'] if rows else 0} {unit} per call)")
    for col in ("model", "pass", "median ms", "spread", f"{unit}/s", "peak MiB", f"time ×{baseline}",
                f"memory ×{baseline}", "note"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("model", "pass", "note") else "right")
    for r in rows:
        table.add_row(
            r["name"],
            r["mode"],
            _fmt(r["seconds"], 1000.0, ".2f"),
            _fmt(r["spread"], 100.0, ".0f", "%"),
            _fmt(r["throughput"], 1.0, ",.0f"),
            _fmt(r["peak_bytes"], 1 / 2**20, ".2f"),
            _fmt(r["ratio"], 1.0, ".2f", "×"),
            _fmt(r["memory_ratio"], 1.0, ".2f", "×"),
            r["note"],
        )
    console.print(table)


def _fmt(x: object, scale: float, spec: str, suffix: str = "") -> str:
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    return f"{x * scale:{spec}}{suffix}"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``itnet bench`` on the CLI's sub-parsers."""
    p = sub.add_parser("bench", help="latency, throughput and peak memory of a bundle's build vs eager/torch.compile")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--plan", help="JSON plan: layer glob -> lowering spec (adds an 'itnet plan' row)")
    p.add_argument("--lowering", action="append", default=[], metavar="GLOB=SPEC",
                   help="lowering for matching layers, e.g. 'encoder.*=fused' (before --plan entries)")  # fmt: skip
    p.add_argument("--backward", action="store_true", help="also time forward+backward (sum of the outputs)")
    p.add_argument("--backend", choices=("torch", "triton", "torch-cpu", "torch-cuda"), default="torch",
                   help="backend of the itnet builds")  # fmt: skip
    p.add_argument("--source", metavar="SPEC", help="the source model to compare with (runs its code)")
    p.add_argument("--config", help="JSON config for --source (default: the one the bundle records)")
    p.add_argument(
        "--trust-source",
        action="store_true",
        help="compare with the model the bundle records (runs its code: only for bundles you made)",
    )
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    p.add_argument("--repeat", type=int, default=10, help="timed calls per row after one warm-up (default 10)")
    p.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE:DTYPE",
                   help="give one input's shape instead of the example size")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where every model and input lives (auto: cuda when torch sees one)")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.set_defaults(func=cmd_bench)
