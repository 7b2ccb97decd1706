"""The ``itnet`` command line (also ``python cli.py`` from a checkout): convert, inspect, run, calibrate, tune, bench,
lowerings (``tune``: ``tune_cli``; ``bench``: ``benchmark``; ``export``: ``export_cli``).

    itnet convert SPEC -o m.itir [--input name:shape:dtype ...] [--dynamic name:dim[=symbol[:min:max]] ...]
                                 [--config cfg.json] [--seed N]
    itnet inspect m.itir [--cost]
    itnet run m.itir [--check (--source SPEC | --trust-source)] [--plan plan.json] [--lowering 'glob=spec' ...]
                     [--input ...] [--seed N] [--tol T] [--error-budget B] [--backend torch|triton|TARGET]
    itnet tune m.itir --budget 1e-2 [--calib N | --calib-data F ...] [--time-limit S] -o plan.json [--report r.html]
    itnet bench m.itir [--plan plan.json] [--backward] [--source SPEC | --trust-source] [--json out.json]
    itnet lowerings [FAMILY] [--json]

SPEC is ``path/file.py:factory``, ``package.module:factory`` or ``hf:ModelClass`` (with ``--config config.json``).
A user mistake is one line on stderr (``itnet: error: ...``) and a non-zero exit; ``ITNET_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import sympy
import torch
import torch.utils._pytree as pytree

from . import benchmark, config, export_cli, tune_cli
from .api import build, calibrate, convert, load
from .errors import ItnetError, ParseError
from .frontend import specs
from .ir import treespec
from .ir.bundle import read_json, read_tensors
from .ir.core import Program
from .ir.types import DTYPE_NAMES, ScalarType, TensorType
from .plan import Plan
from .report import example_sizes, print_inspect

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one line (``main`` prints it) instead of usage text and ``exit(2)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------------- convert


def cmd_convert(ns: argparse.Namespace) -> int:
    out = Path(ns.output)
    if out.exists() and not out.is_dir():
        raise ItnetError(f"output {out} exists and is not a directory; an IR bundle is a directory (e.g. m.itir)")
    for text in ns.input:
        specs.parse_input(text)  # report bad syntax before building anything
    for text in ns.dynamic:
        specs.parse_dynamic(text)
    cfg = specs.read_config(ns.config) if ns.config else None
    src = specs.Source(
        spec=ns.spec,
        config=cfg,
        config_path=str(Path(ns.config).resolve()) if ns.config else None,
        inputs=list(ns.input),
        dynamic=list(ns.dynamic),
        seed=ns.seed,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=config.debug_level() == 0) as caught:
        if caught is not None:
            warnings.simplefilter("always")
        prog, loaded = _convert_source(src)
    prog.meta["source"] = src.to_json()
    prog.meta["example"] = _example_facts(prog, loaded)
    prog.save(str(out))
    _print_summary(prog, src, out, time.perf_counter() - t0, len(caught or []), loaded.notes)
    return 0


def _convert_source(src: specs.Source) -> tuple[Program, specs.Loaded]:
    """Build and convert; a range violation on a symbol the user gave no range is retried once with torch's fix."""
    loaded = specs.load_source(src)
    try:
        return _convert_loaded(loaded), loaded
    except ItnetError as e:
        fixes = specs.suggested_ranges(e)
        if not fixes or set(fixes) & specs.user_ranged(src) or set(fixes) <= set(src.ranges):
            hint = specs.suggested_fixes(e)
            if hint:
                raise ItnetError(
                    f"the dynamic sizes do not fit the model: torch.export suggests {hint}; "
                    "give that range with --dynamic name:dim=symbol:min:max"
                ) from e
            raise
    src.ranges.update({k: list(v) for k, v in fixes.items()})
    loaded = specs.load_source(src)
    prog = _convert_loaded(loaded)
    ranges = ", ".join(f"{k} in [{lo or 0}, {hi if hi is not None else 'inf'}]" for k, (lo, hi) in fixes.items())
    loaded.notes.append(f"dynamic sizes narrowed to what the model allows: {ranges}")
    return prog, loaded


def _convert_loaded(loaded: specs.Loaded) -> Program:
    return convert(loaded.model, loaded.args, loaded.kwargs, dynamic_shapes=loaded.dynamic_shapes)


def _example_facts(prog: Program, loaded: specs.Loaded) -> dict:
    """The example inputs' symbol sizes and integer ranges, per program input (for ``run`` and ``inspect --cost``)."""
    leaves = _flat_inputs(prog, loaded.args, loaded.kwargs)
    values = prog.inputs
    if len(leaves) != len(values):  # export made some non-tensor inputs constants: pair the tensors only
        leaves = [x for x in leaves if isinstance(x, torch.Tensor)]
        values = [v for v in values if isinstance(v.type, TensorType)]
    sizes: dict[str, int] = {}
    inputs = []
    for v, leaf in zip(values, leaves, strict=False):
        entry: dict[str, object] = {"name": v.name}
        if isinstance(v.type, TensorType) and isinstance(leaf, torch.Tensor):
            for d, n in zip(v.type.shape, leaf.shape, strict=False):
                if isinstance(d, sympy.Symbol):
                    sizes.setdefault(d.name, int(n))
            if not leaf.dtype.is_floating_point and not leaf.dtype.is_complex and leaf.numel():
                declared = loaded.int_ranges.get(v.name)
                entry["range"] = declared or [int(leaf.min()), int(leaf.max()) + 1]
        inputs.append(entry)
    return {"sizes": sizes, "inputs": inputs}


def _flat_inputs(prog: Program, args: tuple, kwargs: dict) -> list[object]:
    """The example call flattened in the program's input order (keyword inputs in the exported order)."""
    spec = prog.in_spec
    if isinstance(spec, dict) and len(spec.get("children", [])) == 2 and isinstance(spec["children"][1], dict):
        order = spec["children"][1].get("context") or []
        kwargs = {k: kwargs[k] for k in order if k in kwargs}
    return pytree.tree_leaves((tuple(args), kwargs))


def _print_summary(prog: Program, src: specs.Source, out: Path, secs: float, hidden: int, notes: list[str]) -> None:
    families = Counter(n.family for n in prog.transforms)
    fam_text = ", ".join(f"{n} {f}" for f, n in sorted(families.items())) or "none"
    print(f"converted {src.spec} in {secs:.1f}s -> {out}")
    print(f"  transforms: {len(prog.transforms)} ({fam_text})")
    print(f"  generic ops: {len(prog.generic_nodes())}")
    if prog.symbols:
        print(
            "  symbols: "
            + ", ".join(f"{k} in [{lo}, {'inf' if hi is None else hi}]" for k, (lo, hi) in prog.symbols.items())
        )
    for note in notes:
        print(f"  note: {note}")
    if hidden:
        print(f"  ({hidden} warning(s) hidden; ITNET_DEBUG=1 shows them)")


# ---------------------------------------------------------------------------------------------- inspect


def cmd_inspect(ns: argparse.Namespace) -> int:
    from rich.console import Console

    prog = _load_bundle(ns.bundle)
    width = None if sys.stdout.isatty() else 200
    console = Console(file=sys.stdout, width=width, markup=False, highlight=False, emoji=False)
    console.print(f"{ns.bundle}: {len(prog.nodes)} nodes, {len(prog.inputs)} inputs, {len(prog.weights)} weights")
    print_inspect(prog, console, cost=ns.cost)
    return 0


def _load_bundle(path: str) -> Program:
    p = Path(path)
    if not p.exists():
        raise ItnetError(f"no such bundle {path}; run itnet convert SPEC -o {path} first")
    try:
        return load(p)
    except ParseError as e:
        text_file = p / "program.itir" if p.is_dir() else p
        raise ItnetError(f"malformed IR in {text_file}: {e}") from e
    except ValueError as e:  # a broken meta.json or weights file
        raise ItnetError(f"cannot read the bundle {path}: {specs.first_line(e)}; re-run itnet convert") from e


# ---------------------------------------------------------------------------------------------- lowerings


def cmd_lowerings(ns: argparse.Namespace) -> int:
    from rich.console import Console

    from .api import lowerings
    from .lowering_table import as_records, print_lowerings

    lowerings(ns.family)  # an unknown family is one error line
    if ns.json:
        print(json.dumps(as_records(ns.family), indent=2, default=str))
        return 0
    width = None if sys.stdout.isatty() else 200
    console = Console(file=sys.stdout, width=width, markup=False, highlight=False, emoji=False)
    print_lowerings(console, ns.family)
    return 0


# ---------------------------------------------------------------------------------------------- run


def cmd_run(ns: argparse.Namespace) -> int:
    prog = _load_bundle(ns.bundle)
    source = _check_source(ns, prog) if ns.check else None
    plan = _plan(ns)
    t0 = time.perf_counter()
    module = build(prog, backend=ns.backend, plan=plan, error_budget=ns.error_budget)
    t_build = time.perf_counter() - t0
    args, kwargs = _run_inputs(prog, ns.input, ns.seed, plan)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = _guarded(lambda: module(*args, **kwargs), "running the program")
    t_run = time.perf_counter() - t0
    lowerings = Counter(n.lowering for n in module.program.transforms)
    low_text = ", ".join(f"{n} {k}" for k, n in sorted(lowerings.items())) or "no transforms"
    print(f"ran {ns.bundle}: built in {t_build:.2f}s ({low_text}), forward {1000 * t_run:.1f} ms")
    leaves = pytree.tree_leaves(out)
    for i, leaf in enumerate(leaves):
        print(f"  output {i}: {_describe(leaf)}")
    for layer, est in sorted(getattr(module, "error_estimates", {}).items()):
        print(f"  {layer or '<root>'}: estimated relative error {est.get('rel', float('nan')):.3g} (Monte Carlo)")
    fallbacks = getattr(module, "fallbacks", {})
    if ns.backend == "triton":
        for layer, reason in sorted(fallbacks.items()):
            print(f"  fallback {layer}: runs on the torch backend ({reason})")
        _record_fallbacks(ns.bundle, fallbacks)
    if not ns.check:
        return 0
    assert source is not None
    ref = _reference_outputs(prog, source, args, kwargs)
    return _compare(leaves, pytree.tree_leaves(ref), ns.tol)


def cmd_calibrate(ns: argparse.Namespace) -> int:
    prog = _load_bundle(ns.bundle)
    if ns.calib_data:
        args, kwargs = _data_inputs(prog, ns.calib_data)
    else:
        args, kwargs = _run_inputs(prog, ns.input, ns.seed)
    if args and kwargs:
        raise ItnetError("calibrate takes positional or keyword inputs, not both; this program takes both")
    batch = kwargs if kwargs else tuple(args)
    t0 = time.perf_counter()
    fitted = _guarded(lambda: calibrate(prog, [batch], backend=ns.backend, plan=_plan(ns)), "calibrating the program")
    fitted.save(ns.output)
    layers = fitted.meta.get("fitted") or {}
    print(f"calibrated {ns.bundle} in {time.perf_counter() - t0:.1f}s -> {ns.output}: fitted {len(layers)} layer(s)")
    for layer, entry in sorted(layers.items()):
        print(f"  {layer}: {entry['kind']} ({', '.join(entry['tensors'])})")
    if not layers:
        print("  (no planned lowering fits anything from data; plan e.g. --lowering '*=lowrank:method=learned')")
    return 0


def _data_inputs(prog: Program, path: str) -> tuple[tuple, dict]:
    """The program's inputs from a safetensors file holding one tensor per input, named as ``itnet inspect`` lists."""
    tensors = read_tensors(Path(path))
    missing = [v.name for v in prog.inputs if v.name not in tensors]
    if missing:
        raise ItnetError(f"{path} has no tensor for input(s) {missing}; name one tensor per input as the program does")
    leaves = [tensors[v.name] for v in prog.inputs]
    if prog.in_spec is None:
        return tuple(leaves), {}
    args, kwargs = pytree.tree_unflatten(leaves, treespec.from_json(prog.in_spec))
    return tuple(args), dict(kwargs)


def _check_source(ns: argparse.Namespace, prog: Program) -> specs.Source:
    """The model ``--check`` compares against. Rebuilding it imports and runs code, so it is never taken silently from
    the bundle: the user names it (``--source SPEC``) or says the bundle's own record is trusted (``--trust-source``).
    With ``--source``, only data is taken from the bundle (example-input specs, dynamic sizes, seed, config)."""
    recorded = specs.Source.from_json(prog.meta["source"]) if "source" in prog.meta else None
    if ns.source is None and not ns.trust_source:
        what = f"the model {recorded.spec!r}" if recorded is not None else "no source model"
        raise ItnetError(
            f"{ns.bundle} records {what}; --check rebuilds the source model by running its code, so name it with "
            "--source SPEC [--config cfg.json], or pass --trust-source if you made this bundle yourself"
        )
    if ns.source is None:
        if recorded is None:
            raise ItnetError(
                f"{ns.bundle} records no source model (it was not written by itnet convert); name it with --source SPEC"
            )
        return recorded
    base = recorded or specs.Source(spec=ns.source)
    cfg = specs.read_config(ns.config) if ns.config else base.config
    return specs.Source(
        spec=ns.source, config=cfg, inputs=list(base.inputs), dynamic=list(base.dynamic), seed=base.seed,
        ranges=dict(base.ranges),
    )  # fmt: skip


def _record_fallbacks(bundle: str, fallbacks: dict[str, str]) -> None:
    """Keep the last Triton run's fallbacks in the bundle's meta.json, where ``itnet inspect`` shows them."""
    meta_path = Path(bundle) / "meta.json"
    if not meta_path.exists():
        return
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        return
    meta["fallbacks"] = {"backend": "triton", "layers": dict(fallbacks)}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def _plan(ns: argparse.Namespace) -> dict[str, str] | Plan | None:
    """``--lowering`` rules before ``--plan`` entries; a tuned plan file (``itnet tune``) is loaded whole, so that
    ``build`` checks it was made for this program, device and versions."""
    from .passes.plan import load_plan

    if ns.plan and Plan.is_tuned(ns.plan):
        if ns.lowering:
            raise ItnetError(f"{ns.plan} is a tuned plan; --lowering cannot amend it: tune again, or edit its layers")
        return Plan.load(ns.plan)
    rules: dict[str, str] = {}
    for text in ns.lowering:
        glob, eq, spec = text.partition("=")
        if not eq or not glob.strip() or not spec.strip() or ":" in glob:
            raise ItnetError(f"--lowering {text!r} is not glob=spec; write e.g. 'encoder.*=fused' or 'conv?=dense'")
        rules[glob.strip()] = spec.strip()
    if ns.plan:
        for glob, spec in load_plan(ns.plan).items():
            rules.setdefault(glob, spec)  # --lowering entries come first and win
    return rules or None


def _run_inputs(prog: Program, overrides: Sequence[str], seed: int, plan: object = None) -> tuple[tuple, dict]:
    """Random inputs of the program's types at the example sizes (a tuned plan's sizes, given one); ``--input``
    replaces any of them by name."""
    sizes = {**example_sizes(prog), **(plan.sizes if isinstance(plan, Plan) else {})}
    example = prog.meta.get("example") if isinstance(prog.meta.get("example"), dict) else {}
    facts = example.get("inputs", []) if isinstance(example.get("inputs"), list) else []
    ranges = {f.get("name"): f.get("range") for f in facts if isinstance(f, dict) and f.get("range")}
    by_name: dict[str, specs.InputSpec] = {}
    for text in overrides:
        s = specs.parse_input(text)
        if s.name not in {v.name for v in prog.inputs}:
            names = ", ".join(v.name for v in prog.inputs)
            raise ItnetError(f"--input {s.name}: the program has no such input; its inputs are {names}")
        by_name[s.name] = s
    gen = torch.Generator().manual_seed(seed)
    leaves: list[object] = []
    for v in prog.inputs:
        low, high = ranges.get(v.name) or specs.input_range(v.name, None)
        if v.name in by_name:
            s = by_name[v.name]
            shape = [
                _size(e.example if e.example is not None else sympy.Symbol(e.name), sizes, v.name)
                if isinstance(e, specs.SymDim)
                else e
                for e in s.shape
            ]
            leaves.append(_random_input(v.name, shape, s.dtype, low, high, gen))
        elif isinstance(v.type, TensorType):
            shape = [_size(d, sizes, v.name) for d in v.type.shape]
            leaves.append(_random_input(v.name, shape, v.type.dtype, low, high, gen))
        else:
            leaves.append(_scalar(v.type, sizes, v.name))
    if prog.in_spec is None:
        return tuple(leaves), {}
    args, kwargs = pytree.tree_unflatten(leaves, treespec.from_json(prog.in_spec))
    return tuple(args), dict(kwargs)


MAX_RUN_ELEMENTS = 1 << 31


def _random_input(name: str, shape: list[int], dtype: torch.dtype, low: int, high: int, gen) -> torch.Tensor:
    numel = 1
    for n in shape:
        numel *= n
    if numel > MAX_RUN_ELEMENTS or any(n < 0 for n in shape):
        raise ItnetError(f"input '{name}' would be {shape} ({numel} elements); give a smaller one: --input {name}:...")
    return specs.random_tensor(shape, dtype, low, high, gen)


def _size(d: object, sizes: dict[str, int], name: str) -> int:
    val = sympy.sympify(d).subs({s: sizes[s.name] for s in sympy.sympify(d).free_symbols if s.name in sizes})
    if not val.is_Integer:
        raise ItnetError(f"cannot choose a size {d} for input '{name}'; give its shape with --input {name}:...")
    return int(val)


def _scalar(t: ScalarType, sizes: dict[str, int], name: str) -> object:
    if t.kind == "int":
        return _size(t.expr, sizes, name) if t.expr is not None else 1
    return 1.0 if t.kind == "float" else False


def _reference_outputs(prog: Program, source: specs.Source, args: tuple, kwargs: dict) -> object:
    """The source model rebuilt from the bundle's meta, holding the program's weights, run on the same inputs."""
    with warnings.catch_warnings(record=config.debug_level() == 0), torch.no_grad():
        model = specs.load_source(source).model
        state = model.state_dict()
        same = {k: t for k, t in prog.tensors.items() if k in state and state[k].shape == t.shape}
        model.load_state_dict(same, strict=False)
        return _guarded(lambda: model(*args, **kwargs), f"running the source model {source.spec}")


def _compare(got: list[object], want: list[object], tol: float) -> int:
    if len(got) != len(want):
        raise ItnetError(f"the program returns {len(got)} outputs but the source model {len(want)}; re-run convert")
    worst, worst_i = 0.0, -1
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        if a.shape != b.shape:
            raise ItnetError(f"output {i} has shape {list(a.shape)} but the source model gives {list(b.shape)}")
        err = _rel_error(a, b)
        print(f"  output {i}: max relative error {err:.3g}")
        if err > worst or worst_i < 0:
            worst, worst_i = err, i
    print(f"max relative error {worst:.3g} (tolerance {tol:g})")
    if worst > tol:
        raise ItnetError(f"output {worst_i} differs from the source model: max relative error {worst:.3g} > {tol:g}")
    return 0


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (exact comparison for integer and bool outputs)."""
    if not b.dtype.is_floating_point and not b.dtype.is_complex:
        return 0.0 if torch.equal(a, b) else float("inf")
    dt = torch.complex128 if b.is_complex() else torch.float64
    a64, b64 = a.detach().to(dt), b.detach().to(dt)
    diff = (a64 - b64).abs().max().item() if a.numel() else 0.0
    scale = b64.abs().max().item() if b.numel() else 0.0
    if diff != diff:  # nan
        return float("inf")
    return diff / scale if scale > 0 else diff


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{DTYPE_NAMES.get(x.dtype, str(x.dtype))}{list(x.shape)}"
    return f"{type(x).__name__} {x!r}"


def _guarded(fn: Callable[[], object], what: str) -> object:
    try:
        return fn()
    except ItnetError:
        raise
    except Exception as e:
        raise ItnetError(f"{what} failed ({type(e).__name__}: {specs.first_line(e)}); check the --input shapes") from e


# ---------------------------------------------------------------------------------------------- main


def add_plan_args(p: argparse.ArgumentParser, plan_help: str, example: str) -> None:
    """``--plan`` and ``--lowering``, read by ``_plan``."""
    p.add_argument("--plan", help=plan_help)
    p.add_argument("--lowering", action="append", default=[], metavar="GLOB=SPEC",
                   help=f"lowering for matching layers, e.g. '{example}' (before --plan entries)")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="itnet", description="Convert, inspect and run PyTorch models as integral-transform IR.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("convert", help="export a model to an IR bundle")
    p.add_argument("spec", metavar="SPEC", help="path/file.py:factory, package.module:factory or hf:ModelClass")
    p.add_argument("-o", "--output", required=True, help="bundle directory to write (e.g. m.itir)")
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME:SHAPE:DTYPE",
        help="example input, e.g. input_ids:2x16:int64 or x:2xseq:float32 (replaces the factory's)",
    )
    p.add_argument(
        "--dynamic",
        action="append",
        default=[],
        metavar="NAME:DIM[=SYM[:MIN:MAX]]",
        help="mark a dimension dynamic, e.g. input_ids:1=seq:2:512",
    )
    p.add_argument("--config", help="JSON config: the transformers config for hf:, else factory keyword arguments")
    p.add_argument("--seed", type=int, default=0, help="seed for the model's weights and example inputs")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="list the transforms and the generic ops of a bundle")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--cost", action="store_true", help="also evaluate FLOPs at the example sizes")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="build and run a bundle on random inputs (and --check it against the source)")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument(
        "--check", action="store_true", help="compare with the source model (needs --source or --trust-source)"
    )
    p.add_argument(
        "--source",
        metavar="SPEC",
        help="the source model for --check: path/file.py:factory, module:factory or hf:Class",
    )
    p.add_argument("--config", help="JSON config for --source (default: the one the bundle records)")
    p.add_argument(
        "--trust-source",
        action="store_true",
        help="let --check rebuild the source model the bundle records (runs its code: only for bundles you made)",
    )
    add_plan_args(p, "JSON plan: layer glob -> lowering spec", "encoder.*=fused")
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME:SHAPE:DTYPE",
        help="give one input's shape instead of the example size",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs")
    p.add_argument("--tol", type=float, default=1e-4, help="largest relative error --check accepts (default 1e-4)")
    p.add_argument(
        "--error-budget", type=float, default=None, help="cost model picks lowerings within this error per layer"
    )
    p.add_argument("--backend", choices=("torch", "triton", "torch-cpu", "torch-cuda"), default="torch",
                   help="torch (CPU/reference) or triton (GPU, or CPU with TRITON_INTERPRET=1), or a target "
                   "(itnet lowerings lists what each runs)")  # fmt: skip
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("calibrate", help="fit learned lowerings (lowrank:method=learned) on inputs; save with factors")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("-o", "--output", required=True, help="bundle to write: the planned program and its fitted factors")
    p.add_argument("--plan", help="JSON plan: layer glob -> lowering spec")
    p.add_argument("--lowering", action="append", default=[], metavar="GLOB=SPEC",
                   help="lowering for matching layers, e.g. '*.attn=lowrank:method=learned,rank=64'")  # fmt: skip
    p.add_argument("--calib-data", metavar="FILE", help="safetensors file with one tensor per program input")
    p.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE:DTYPE",
                   help="random calibration input of this shape (without --calib-data)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs")
    p.add_argument("--backend", choices=("torch", "triton", "torch-cpu", "torch-cuda"), default="torch")
    p.set_defaults(func=cmd_calibrate)

    tune_cli.add_parser(sub)
    benchmark.add_parser(sub)
    export_cli.add_parser(sub)

    p = sub.add_parser("lowerings", help="list each family's lowerings, their options and the targets running them")
    p.add_argument("family", metavar="FAMILY", nargs="?", help="one family only (stationary, dot_exp, ssm, gated)")
    p.add_argument("--json", action="store_true", help="the registry as JSON")
    p.set_defaults(func=cmd_lowerings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``itnet`` console script; returns the exit status."""
    parser = _parser()
    try:
        try:
            ns = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 0
        if getattr(ns, "func", None) is None:
            raise _UsageError("choose a command (itnet --help lists them)")
        return ns.func(ns)
    except _UsageError as e:
        return _fail(str(e), EXIT_USAGE)
    except ItnetError as e:
        return _fail(str(e), EXIT_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:
        msg = f"internal error ({type(e).__name__}: {specs.first_line(e)}); ITNET_DEBUG=1 shows the traceback"
        return _fail(msg, EXIT_INTERNAL)


def _fail(message: str, code: int) -> int:
    if config.debug_level() >= 1 and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"itnet: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
