"""The compiler, top to bottom: one ordered list of named steps from an exported graph to planned IR.

Each step is (Program, Context) -> Program; the verifier runs before the first step and after every step
(``ITNET_DEBUG=1`` names each step, ``ITNET_DEBUG=2`` prints the IR after each). ``convert`` runs the ``recognise``
phase; ``build`` and ``plan_program`` run the ``plan`` phase for their target. The backends (``backends/``) then
turn planned IR into modules; they add no steps.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import config
from ..errors import ItnetError
from ..ir.core import Program
from ..ir.target import Target, get_target
from ..ir.verify import verify
from . import einsum, recognize_attention, recognize_conv
from .choose_lowering import ChooseOptions, choose_auto
from .cleanup import dce
from .fold_masks import fold_masks
from .plan import apply_plan, resolve_auto
from .rewrite import apply_rules


@dataclass(frozen=True)
class Context:
    """What the steps may read besides the program: the target, the user's plan, the cost model's options."""

    target: Target = field(default_factory=get_target)
    plan: dict[str, str] | str | Path | None = None
    choose: ChooseOptions | None = None  # None: no cost model; every auto takes the target's exact default


@dataclass(frozen=True)
class Step:
    name: str
    phase: str  # recognise | plan
    run: Callable[[Program, Context], Program]
    doc: str


def _rules(rules) -> Callable[[Program, Context], Program]:
    def run(prog: Program, ctx: Context) -> Program:
        apply_rules(prog, rules)
        return prog

    return run


def _dce(prog: Program, ctx: Context) -> Program:
    return dce(prog)


def _fold(prog: Program, ctx: Context) -> Program:
    return fold_masks(prog)


def _plan(prog: Program, ctx: Context) -> Program:
    return apply_plan(prog, ctx.plan, ctx.target)


def _choose(prog: Program, ctx: Context) -> Program:
    return prog if ctx.choose is None else choose_auto(prog, ctx.choose, ctx.target)


def _resolve(prog: Program, ctx: Context) -> Program:
    return resolve_auto(prog, ctx.target)


PIPELINE: list[Step] = [
    Step("dce", "recognise", _dce, "drop what nothing reads (export leaves dead shape ops)"),
    Step("recognise-convolution", "recognise", _rules(recognize_conv.RULES), "aten convolutions -> stationary"),
    Step("canonicalise-einsum", "recognise", _rules(einsum.RULES), "batched-matmul einsums -> permute/matmul"),
    Step("recognise-attention", "recognise", _rules(recognize_attention.RULES), "SDPA and softmax chains -> dot_exp"),
    Step("fold-constant-masks", "recognise", _fold, "constant masks -> causal / window support"),
    Step("dce-after-recognition", "recognise", _dce, "drop the ops the rewrites replaced"),
    Step("apply-plan", "plan", _plan, "the user's plan, checked against the registry and the target"),
    Step("choose-lowering", "plan", _choose, "the cost model within an error budget (only with one)"),
    Step("resolve-auto", "plan", _resolve, "every auto -> the target's exact default"),
]
PHASES = ("recognise", "plan")


def step(name: str) -> Step:
    for s in PIPELINE:
        if s.name == name:
            return s
    raise ItnetError(f"no pipeline step {name!r}; steps are: {', '.join(s.name for s in PIPELINE)}")


def run(prog: Program, ctx: Context | None = None, phases: Sequence[str] = PHASES) -> Program:
    """The steps of ``phases``, in pipeline order, with the verifier between steps."""
    return run_steps(prog, [s for s in PIPELINE if s.phase in phases], ctx)


def run_steps(prog: Program, steps: Sequence[Step], ctx: Context | None = None) -> Program:
    ctx = ctx or Context()
    verify(prog)
    for s in steps:
        prog = s.run(prog, ctx)
        verify(prog)
        if config.debug_level() >= 1:
            counts = f"{len(prog.nodes)} nodes, {len(prog.transforms)} transforms"
            print(f"[itnet] after {s.name}: {counts}", file=sys.stderr)
        if config.debug_level() >= 2:
            print(prog, file=sys.stderr)
    return prog
