"""The public surface (DESIGN §4): convert, parse, load, build."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .errors import ItnetError
from .frontend.export import export_model
from .ir.bundle import load as _load
from .ir.core import Program
from .ir.parser import parse as _parse
from .ir.verify import verify
from .passes import pipeline
from .passes.choose_lowering import ChooseOptions


def convert(
    model: torch.nn.Module,
    args: Sequence[object] | object,
    kwargs: Mapping[str, object] | None = None,
    dynamic_shapes: object = None,
) -> Program:
    """Export ``model`` on example inputs and return its integral-transform IR (lowerings still ``auto``)."""
    if not isinstance(model, torch.nn.Module):
        raise ItnetError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, (tuple, list)):
        args = (args,)
    prog = export_model(model, args, kwargs, dynamic_shapes)
    return pipeline.recognise(prog)


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
    """A copy of ``prog`` with the plan applied and every ``auto`` lowering resolved for ``backend``.

    With ``error_budget`` (relative error per layer, 0 = exact only) the cost model chooses the fastest lowering
    whose predicted error fits, at ``sizes`` for the symbolic dimensions (default: the bundle's example sizes)."""
    choose = None
    if error_budget is not None:
        choose = ChooseOptions(error_budget=float(error_budget), sizes=dict(sizes or _example_sizes(prog)))
    return pipeline.run_steps(prog.clone(), pipeline.plan_steps(plan, backend, choose))


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

    ``plan`` forces lowerings per layer (globs); ``error_budget`` lets the cost model choose the rest (see
    ``plan_program``). The chosen lowerings are in ``module.program``; Monte Carlo layers report their error
    estimates in ``module.error_estimates`` after each forward."""
    if backend not in ("torch", "triton"):
        raise ItnetError(f"unknown backend {backend!r}; available: torch, triton")
    planned = plan_program(prog, plan, backend, error_budget, sizes)
    from .backends.torch.typecheck import check_program

    check_program(planned)  # declared types against what each op produces (a bundle may declare anything)
    if backend == "torch":
        from .backends.torch.codegen import build_torch

        return build_torch(planned)
    from .backends.triton.codegen import build_triton

    return build_triton(planned)
