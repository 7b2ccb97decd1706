"""The public surface (DESIGN §4): convert, parse, load, build, and the lowering registry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .errors import ItnetError
from .frontend.export import export_model
from .ir import target as _target
from .ir.bundle import load as _load
from .ir.core import Program
from .ir.lowering import Lowering
from .ir.lowering import lowerings as _lowerings
from .ir.parser import parse as _parse
from .ir.target import TARGETS, Target, get_target
from .ir.verify import verify
from .passes import pipeline
from .passes.choose_lowering import ChooseOptions


def _load_backends() -> None:
    """Import the backends: their registrations fill each target's record of what it runs."""
    from .backends.torch import lowerings as _torch  # noqa: F401
    from .backends.triton import codegen as _triton  # noqa: F401


_target.LOADER.append(_load_backends)


def lowerings(family: str | None = None) -> list[Lowering]:
    """The lowering records (all, or one family's): options with type, default and range, exactness, error model.
    Which targets run each: ``itc.targets()``."""
    _target.ensure_loaded()
    if family is not None and not _lowerings(family):
        from .ir.families import FAMILIES

        raise ItnetError(f"unknown family {family!r}; families are: {', '.join(FAMILIES)}")
    return _lowerings(family)


def targets() -> dict[str, Target]:
    """The target records by name (torch-cpu, torch-cuda, triton): what each runs, its defaults and ceilings."""
    _target.ensure_loaded()
    return dict(TARGETS)


def convert(
    model: torch.nn.Module,
    args: Sequence[object] | object = (),
    kwargs: Mapping[str, object] | None = None,
    dynamic_shapes: object = None,
) -> Program:
    """Export ``model`` on example inputs and return its integral-transform IR (lowerings still ``auto``).

    ``model`` may also be an ONNX file (``"model.onnx"``) or ``onnx.ModelProto``: ``args`` then optionally replace
    the example inputs made from its declared input types (its dim_params become symbols)."""
    if isinstance(model, (str, Path)) or type(model).__name__ == "ModelProto":
        from .frontend.onnx_import import import_onnx

        module, example, dyn = import_onnx(model, inputs=tuple(args) if args else None)
        prog = export_model(module, example, None, dyn if dynamic_shapes is None else dynamic_shapes)
        return pipeline.run(prog, phases=("recognise",))
    if not isinstance(model, torch.nn.Module):
        raise ItnetError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, (tuple, list)):
        args = (args,)
    prog = export_model(model, args, kwargs, dynamic_shapes)
    return pipeline.run(prog, phases=("recognise",))


def parse(text: str) -> Program:
    prog = _parse(text)
    verify(prog)
    return prog


def load(path: str | Path) -> Program:
    return _load(path)


def plan_program(
    prog: Program,
    plan: dict[str, str] | str | Path | None = None,
    backend: str = "torch",
    error_budget: float | None = None,
    sizes: dict[str, int] | None = None,
) -> Program:
    """A copy of ``prog`` with the plan applied and every ``auto`` lowering resolved for ``backend`` (a backend,
    torch or triton, or a target name: torch-cpu, torch-cuda, triton), through the pipeline's ``plan`` phase.

    With ``error_budget`` (relative error per layer, 0 = exact only) the cost model chooses the fastest lowering
    whose predicted error fits, at ``sizes`` for the symbolic dimensions (default: the bundle's example sizes)."""
    choose = None
    if error_budget is not None:
        choose = ChooseOptions(error_budget=float(error_budget), sizes=dict(sizes or _example_sizes(prog)))
    ctx = pipeline.Context(target=get_target(backend), plan=plan, choose=choose)
    return pipeline.run(prog.clone(), ctx, phases=("plan",))


def calibrate(
    prog: Program,
    inputs: object,
    backend: str = "torch",
    plan: dict[str, str] | str | Path | None = None,
    error_budget: float | None = None,
) -> Program:
    """Fit what the planned lowerings learn from data (``lowrank:method=learned`` features) on calibration inputs and
    return the planned program holding the fitted factors: saved with it (``fitted.safetensors``), reused by every
    ``build`` of it, so a deployed model is not refitted on whatever it first sees.

    ``inputs``: one batch (a tensor, a tuple of positional inputs or a dict of keyword inputs) or a list of such
    batches; each layer fits on the first batch that reaches it (later batches run, as a check that the fitted
    program executes)."""
    module = build(prog, backend, plan, error_budget)
    batches = inputs if isinstance(inputs, list) else [inputs]
    if not batches:
        raise ItnetError("calibrate needs at least one batch of inputs")
    with torch.no_grad():
        for batch in batches:
            if isinstance(batch, dict):
                module(**batch)
            else:
                module(*(batch if isinstance(batch, tuple) else (batch,)))
    out = module.program.clone()
    meta, tensors = module.runtime.fitted()
    out.meta = {**out.meta, "fitted": meta}
    out.fitted = tensors
    return out


def tune(
    prog: Program,
    calib_inputs: object,
    budget: float = 1e-2,
    backend: str = "torch",
    time_limit: float | None = None,
    held_out: object | None = None,
    repeat: int = 5,
    progress: object | None = None,
    keep: int = 16,
    per_layer: int = 4,
):
    """The fastest per-layer plan within ``budget`` (relative error of the outputs), measured on ``calib_inputs``
    and verified on ``held_out``: an ``itnet_compiler.plan.Plan`` (see ``itnet_compiler.tuner``; ``Plan.save``
    writes the file ``build(prog, plan=path)`` and ``itnet run --plan`` reuse)."""
    from .tuner import tune as _tune

    return _tune(prog, calib_inputs, budget, backend, time_limit, held_out, repeat, progress, keep, per_layer)


def _example_sizes(prog: Program) -> dict[str, int]:
    example = prog.meta.get("example")
    sizes = example.get("sizes") if isinstance(example, dict) else None
    return {str(k): int(v) for k, v in sizes.items()} if isinstance(sizes, dict) else {}


def build(
    prog: Program,
    backend: str = "torch",
    plan: dict[str, str] | str | Path | None = None,
    error_budget: float | None = None,
    sizes: dict[str, int] | None = None,
) -> torch.nn.Module:
    """Compile a program into a ``torch.nn.Module`` that is called like the source model.

    ``plan`` forces lowerings per layer (globs), or is a tuned ``Plan`` (``itc.tune``; a plan file written by
    ``itnet tune``), refused when made for another program, backend, device or library versions, and whose module
    refuses inputs of other sizes than it was tuned at; ``error_budget`` lets the cost model choose the rest (see
    ``plan_program``). The chosen lowerings are in ``module.program``; Monte Carlo layers report their error
    estimates in ``module.error_estimates`` after each forward."""
    from .plan import resolve_plan

    target = get_target(backend)
    plan, plan_sizes = resolve_plan(prog, plan, target.name)
    planned = plan_program(prog, plan, target.name, error_budget, sizes)
    if target.backend == "torch":
        from .backends.torch.codegen import build_torch

        module = build_torch(planned)
    else:
        from .backends.triton.codegen import build_triton

        module = build_triton(planned)
    module.plan_sizes = plan_sizes
    return module
