"""The compiler, top to bottom: the ordered list of named steps that turn an exported graph into planned IR.

Each step is Program -> Program; the verifier runs after every step (``ITNET_DEBUG=2`` prints the IR after each).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from .. import config
from ..ir.core import Program
from ..ir.verify import verify
from . import recognize_attention, recognize_conv
from .choose_lowering import ChooseOptions, choose_lowering
from .cleanup import dce
from .fold_masks import fold_masks
from .plan import apply_plan, resolve_auto
from .rewrite import apply_rules

Step = tuple[str, Callable[[Program], Program]]


def _rules(rules) -> Callable[[Program], Program]:
    def run(prog: Program) -> Program:
        apply_rules(prog, rules)
        return prog

    return run


RECOGNISE: list[Step] = [
    ("dce", dce),
    ("recognise-convolution", _rules(recognize_conv.RULES)),
    ("recognise-attention", _rules(recognize_attention.RULES)),
    ("fold-constant-masks", fold_masks),
    ("dce", dce),
]


def run_steps(prog: Program, steps: list[Step]) -> Program:
    verify(prog)
    for name, fn in steps:
        prog = fn(prog)
        verify(prog)
        if config.debug_level() >= 1:
            print(f"[itnet] after {name}: {len(prog.nodes)} nodes, {len(prog.transforms)} transforms", file=sys.stderr)
        if config.debug_level() >= 2:
            print(prog, file=sys.stderr)
    return prog


def recognise(prog: Program) -> Program:
    return run_steps(prog, RECOGNISE)


def plan_steps(
    plan: dict[str, str] | str | Path | None, backend: str = "torch", choose: ChooseOptions | None = None
) -> list[Step]:
    """Apply the plan; then either the cost model picks lowerings within an error budget (``choose``), or every
    ``auto`` gets its family's exact default for the backend. Anything the cost model leaves at ``auto`` (families
    without cost rules) gets the exact default too."""
    steps: list[Step] = [("apply-plan", lambda p: apply_plan(p, plan))]
    if choose is not None:
        steps.append(("choose-lowering", lambda p: choose_lowering(p, choose)))
    steps.append(("resolve-auto", lambda p: resolve_auto(p, backend)))
    return steps
