"""Tuned plans: per layer the chosen lowering spec and how it was decided, with the device, library versions, symbol
sizes and program hash it was tuned for. ``build(prog, plan=...)`` resolves one through ``resolve_plan`` and refuses a
stale one with one line saying what differs."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import ItnetError, first_line
from .ir.core import Program
from .ir.printer import print_program
from .ir.target import get_target

PLAN_FORMAT = 1


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """The tuner's result: ``layers`` (layer -> lowering spec, what ``build`` applies) and how it was decided."""

    layers: dict[str, str]
    budget: float
    backend: str
    device: str
    versions: dict[str, str]
    sizes: dict[str, int]
    program: str
    measurements: dict[str, dict] = field(default_factory=dict)
    end_to_end: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    format: int = PLAN_FORMAT

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @staticmethod
    def from_json(data: object, where: str = "plan") -> Plan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ItnetError(f"{where} is not an itnet plan of format {PLAN_FORMAT}; run itnet tune to make one")
        try:
            plan = Plan(**{k: data[k] for k in data if k in Plan.__dataclass_fields__})
        except TypeError as e:
            raise ItnetError(f"{where} is missing plan entries ({first_line(e)}); run itnet tune again") from None
        ok = (
            isinstance(plan.layers, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in plan.layers.items())
            and isinstance(plan.versions, dict)
            and isinstance(plan.sizes, dict)
            and all(isinstance(v, int) for v in plan.sizes.values())
            and isinstance(plan.program, str)
            and isinstance(plan.device, str)
            and isinstance(plan.budget, (int, float))
        )
        if not ok:
            raise ItnetError(f"{where} has malformed entries; run itnet tune again")
        return plan

    @staticmethod
    def is_tuned(path: str | Path) -> bool:
        """Whether the JSON file at ``path`` is a tuned plan (not a bare layer -> spec mapping)."""
        from .ir.bundle import read_json

        p = Path(path)
        if not p.is_file():
            return False
        data = read_json(p)
        return isinstance(data, dict) and "format" in data and "program" in data

    @staticmethod
    def load(path: str | Path) -> Plan:
        from .ir.bundle import read_json

        p = Path(path)
        if not p.exists():
            raise ItnetError(f"plan file {path} does not exist; run itnet tune -o {path} first")
        return Plan.from_json(read_json(p), f"plan file {path}")

    def stale(self, prog: Program, backend: str | None = None) -> str | None:
        """What differs between where this plan was made and here (program, backend, device, versions), or None."""
        diffs = []
        if self.program != program_hash(prog):
            diffs.append("the program (its structure or weights) changed")
        if backend is not None and get_target(backend).backend != get_target(self.backend).backend:
            diffs.append(f"backend {self.backend} vs {backend}")
        here = device_name(self.backend)
        if self.device != here:
            diffs.append(f"device {self.device!r} vs {here!r}")
        now = versions()
        changed = [f"{k} {self.versions.get(k)} vs {v}" for k, v in now.items() if self.versions.get(k) != v]
        if changed:
            diffs.append("versions " + ", ".join(changed))
        return "; ".join(diffs) or None


def program_hash(prog: Program) -> str:
    """sha256 of the program's text with lowerings left out (a plan applies to any planning of the program) and of
    its weights' bytes."""
    text = re.sub(r'lowering="[^"]*"', "", print_program(prog))
    h = hashlib.sha256(text.encode())
    for key in sorted(prog.tensors):
        t = prog.tensors[key].detach()
        h.update(f"{key}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def device_name(backend: str) -> str:
    if get_target(backend).backend == "triton" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for pkg in ("itnet-compiler", "triton"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "none"
    return out


def literal(layer: str) -> str:
    """A plan key that matches exactly this layer (plan keys are fnmatch globs)."""
    return re.sub(r"([*?\[])", r"[\1]", layer)


def literal_plan(specs: dict[str, str]) -> dict[str, str]:
    return {literal(k): v for k, v in specs.items()}


def resolve_plan(prog: Program, plan: object, backend: str) -> tuple[object, dict[str, int] | None]:
    """``build``'s plan argument: a tuned ``Plan`` (or a file holding one) is checked against this program, backend,
    device and versions and becomes its layer specs and sizes; anything else passes through unchanged."""
    where = "the plan"
    if isinstance(plan, (str, Path)) and Plan.is_tuned(plan):
        where = f"plan {plan}"
        plan = Plan.load(plan)
    if not isinstance(plan, Plan):
        return plan, None
    diff = plan.stale(prog, backend)
    if diff is not None:
        raise ItnetError(f"{where} was tuned elsewhere: {diff}; run itnet tune --retune, or build without it")
    return dict(plan.layers), dict(plan.sizes)
