"""Apply a lowering plan, then resolve what is still ``auto``. Valid IR in, valid IR out.

A plan maps layer names (fnmatch globs; first match wins in the plan's order) to lowering specs
(``fused`` or ``montecarlo:samples=128``). A plan may be a dict, or the path of a JSON file holding either that dict
or ``{"layers": {...}}``. Layers still at ``auto`` afterwards get the exact default of their family. The chosen
lowering is written into each node's attributes, so the printed IR says what runs.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from ..errors import ItnetError
from ..ir.bundle import read_json
from ..ir.core import Program
from ..ir.families import LOWERINGS, parse_lowering

# Exact defaults per backend: the vendor library on the torch backend (fastest on the CPU), generated kernels on the
# Triton backend where one exists.
EXACT_DEFAULT = {"stationary": "library", "dot_exp": "library", "ssm": "scan", "gated": "library"}
EXACT_DEFAULT_TRITON = {"dot_exp": "fused", "stationary": "fused", "ssm": "scan", "gated": "scan"}


def load_plan(plan: dict[str, str] | str | Path | None) -> dict[str, str]:
    if plan is None:
        return {}
    if isinstance(plan, dict):
        return {str(k): str(v) for k, v in plan.items()}
    path = Path(plan)
    if not path.exists():
        raise ItnetError(f"plan file {path} does not exist; pass a JSON file mapping layer globs to lowerings")
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("layers"), dict):
        data = data["layers"]
    if not isinstance(data, dict):
        raise ItnetError(f"plan file {path} must hold an object mapping layer globs to lowering specs")
    return {str(k): str(v) for k, v in data.items()}


def apply_plan(prog: Program, plan: dict[str, str] | str | Path | None) -> Program:
    rules = load_plan(plan)
    used: set[str] = set()
    for node in prog.transforms:
        for pattern, spec in rules.items():
            if not (fnmatch.fnmatchcase(node.layer, pattern) or pattern == node.outputs[0].name):
                continue
            try:
                name, _ = parse_lowering(spec)
            except ValueError as e:
                raise ItnetError(f"plan entry {pattern!r}: {e}; write e.g. 'montecarlo:samples=128,seed=0'") from None
            if name not in LOWERINGS[node.family]:
                continue  # a glob may cover layers of several families; only matching ones take the spec
            reason = node.attrs.admits(name)
            if reason and _is_glob(pattern):
                used.add(pattern)
                continue  # a glob leaves such layers at their exact default; the printed IR shows which
            if reason:
                raise ItnetError(f"cannot use lowering '{name}': {reason}; choose dense or library", layer=node.layer)
            node.attrs = node.attrs.replace(lowering=spec)
            used.add(pattern)
            break
    unused = set(rules) - used
    if unused:
        layers = ", ".join(sorted({n.layer for n in prog.transforms})[:6])
        raise ItnetError(
            f"plan entries {sorted(unused)} match no transform layer (or no layer whose family admits that lowering); "
            f"layers are: {layers}"
        )
    return prog


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def resolve_auto(prog: Program, backend: str = "torch") -> Program:
    defaults = {**EXACT_DEFAULT, **(EXACT_DEFAULT_TRITON if backend == "triton" else {})}
    for node in prog.transforms:
        if parse_lowering(node.attrs.lowering)[0] != "auto":
            continue
        choice = defaults.get(node.family, "dense")
        if node.attrs.admits(choice):
            choice = EXACT_DEFAULT.get(node.family, "dense")
        node.attrs = node.attrs.replace(lowering=choice)
    return prog
