"""Apply a lowering plan; resolve what is still ``auto``. Valid IR in, valid IR out.

A plan maps layer names (fnmatch globs; first match wins in the plan's order) to lowering specs
(``fused`` or ``montecarlo:samples=128``). A plan may be a dict, or the path of a JSON file holding either that dict
or ``{"layers": {...}}``. Every entry is checked against the lowering registry and the target: an unknown lowering,
an unknown option or a bad value, or a lowering the target does not run, is one ItnetError naming the layer (or the
entry) and the valid choices. A glob may cover layers of several families; only those whose family has the named
lowering take it, and a glob leaves a layer the lowering does not admit at its exact default. The chosen lowering is
written into each node's attributes, so the printed IR says what runs.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from ..errors import ItnetError
from ..ir.bundle import read_json
from ..ir.core import Node, Program
from ..ir.lowering import AUTO, REGISTRY, LoweringSpec, names
from ..ir.target import Target, get_target


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


def parse_plan(rules: dict[str, str]) -> dict[str, LoweringSpec]:
    """Each entry's spec, parsed, naming a lowering that some family has."""
    known = sorted({n for _, n in REGISTRY})
    out = {}
    for pattern, text in rules.items():
        try:
            spec = LoweringSpec.parse(text)
        except ValueError as e:
            raise ItnetError(f"plan entry {pattern!r}: {e}; write e.g. 'montecarlo:samples=128,seed=0'") from None
        if spec.name != AUTO and spec.name not in known:
            raise ItnetError(f"plan entry {pattern!r}: unknown lowering {spec.name!r}; lowerings are: "
                             f"{', '.join([AUTO, *known])} (itnet lowerings lists them by family)")  # fmt: skip
        out[pattern] = spec
    return out


def apply_plan(prog: Program, plan: dict[str, str] | str | Path | None, target: Target | None = None) -> Program:
    target = target or get_target()
    rules = parse_plan(load_plan(plan))
    used: set[str] = set()
    for node in prog.transforms:
        for pattern, spec in rules.items():
            if not (fnmatch.fnmatchcase(node.layer, pattern) or pattern == node.outputs[0].name):
                continue
            if spec.name != AUTO and spec.name not in names(node.family):
                continue  # a glob may cover layers of several families; only matching ones take the spec
            if spec.name != AUTO and not _fits(node, spec, target, _is_glob(pattern)):
                used.add(pattern)
                continue  # a glob leaves such layers at their exact default; the printed IR shows which
            node.attrs = node.attrs.replace(lowering=spec)
            used.add(pattern)
            break
    unused = set(rules) - used
    if unused:
        layers = ", ".join(sorted({n.layer for n in prog.transforms})[:6])
        raise ItnetError(
            f"plan entries {sorted(unused)} match no transform layer (or no layer whose family has that lowering); "
            f"layers are: {layers}"
        )
    return prog


def _fits(node: Node, spec: LoweringSpec, target: Target, glob: bool) -> bool:
    """Whether the layer takes ``spec`` on ``target``; ItnetError when it cannot and the entry names it alone."""
    family, name = node.family, spec.name
    rec = REGISTRY[(family, name)]
    if not target.can_run(family, name):
        choices = ", ".join(target.choices(family)) or "none"
        raise ItnetError(f"lowering '{name}' of family {family} does not run on target {target.name}; "
                         f"choose one of {choices}", layer=node.layer)  # fmt: skip
    opts = rec.make(spec, node.layer, target.tiles(family, name))
    reason = rec.why_not(node.attrs, opts)
    if reason and glob:
        return False
    if reason:
        choices = [n for n in target.choices(family) if REGISTRY[(family, n)].why_not(node.attrs) is None]
        raise ItnetError(f"cannot use lowering '{name}': {reason}; choose one of {', '.join(choices)}",
                         layer=node.layer)  # fmt: skip
    return True


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def resolve_auto(prog: Program, target: Target | str | None = None) -> Program:
    """Every ``auto`` becomes the target's exact default for its node."""
    target = get_target(target) if isinstance(target, str) or target is None else target
    for node in prog.transforms:
        if node.attrs.lowering.name == AUTO:
            node.attrs = node.attrs.replace(lowering=LoweringSpec(target.exact_default(node.attrs, node.layer)))
    return prog
