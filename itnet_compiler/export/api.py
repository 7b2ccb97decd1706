"""The public export functions (``itc.export_onnx``, ``itc.export_mlir``, ``itc.export_triton``): each plans the
program (a plan dict or file, or a tuned plan, as ``itc.build`` takes), then writes what it was asked for."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ItnetError
from ..ir.core import Program

if TYPE_CHECKING:
    import onnx


def planned(prog: Program, plan: object = None) -> tuple[Program, dict[str, int] | None]:
    """``prog`` with ``plan`` applied and every lowering resolved for the torch target, and a tuned plan's sizes."""
    from ..api import plan_program
    from ..plan import Plan

    sizes = None
    if isinstance(plan, (str, Path)) and Plan.is_tuned(plan):
        plan = Plan.load(plan)
    if isinstance(plan, Plan):
        why = plan.stale(prog, plan.backend)
        if why is not None and "program" in why:
            raise ItnetError(f"the plan was tuned for another program: {why}; run itnet tune again")
        plan, sizes = dict(plan.layers), dict(plan.sizes)
    return plan_program(prog, plan, "torch-cpu"), sizes


def export_onnx(
    prog: Program,
    path: str | Path | None = None,
    *,
    plan: object = None,
    opset: int = 18,
    keep_transforms: bool = False,
    fallback: str | None = None,
) -> onnx.ModelProto:  # noqa: F821
    """The program as an ONNX model (checked with ``onnx.checker`` full_check), written to ``path`` if given.

    Exact lowerings become standard ops (Attention at opset >= 23, MatMul/Softmax below; Conv/ConvTranspose;
    LSTM/GRU; Scan for ssm); ``lowrank`` (FAVOR+) and per-row ``montecarlo`` attention are decomposed into standard
    ops with their seeded draws as constants (static sizes). ``keep_transforms`` keeps each transform as a call of
    an ``itnet``-domain ONNX function; ``fallback="trace"`` decomposes lowerings that have no mapping."""
    from .onnx_export import export_onnx as _export

    p, sizes = planned(prog, plan)
    return _export(p, path, opset=opset, keep_transforms=keep_transforms, fallback=fallback, sizes=sizes)


def export_mlir(prog: Program, path: str | Path | None = None, *, dialect: str = "torch", plan: object = None) -> str:
    """The program as MLIR text in ``dialect`` (torch, linalg, stablehlo, tosa) through torch-mlir; written to
    ``path`` if given. The text is parsed back by torch-mlir before it is returned."""
    from .mlir import export_mlir_planned

    p, sizes = planned(prog, plan)
    return export_mlir_planned(p, path, dialect, sizes)


def export_triton(
    prog: Program, out_dir: str | Path, *, plan: object = None, target: str | None = None, sizes: dict | None = None
) -> dict:
    """A self-contained Triton bundle in ``out_dir`` (kernels, launcher ``itnet_bundle.py``, manifest, weights):
    ``itnet_bundle.load(out_dir)`` runs it with torch and triton only, at the export's sizes. Needs a GPU or
    ``TRITON_INTERPRET=1``; ``target="sm_90"`` also compiles the kernels ahead of time; ``sizes`` (symbol -> size)
    fix the dynamic dims (default: the example's, or a tuned plan's). Returns the manifest."""
    from ..plan import Plan
    from .triton_bundle import export_triton_planned

    if isinstance(plan, (str, Path)) and Plan.is_tuned(plan):
        plan = Plan.load(plan)
    if isinstance(plan, Plan):
        plan, sizes = dict(plan.layers), {**plan.sizes, **(sizes or {})}
    return export_triton_planned(prog, out_dir, plan, sizes, target)
