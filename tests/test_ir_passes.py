"""Pass tests written as IR text: each ``tests/ir/*.itir`` file holds an input program, the pipeline steps to run
and the expected output (or error), so a pass's contract is read off the file.

    # RUN: recognise-attention, dce-after-recognition     steps of passes/pipeline.py, in order
    # TARGET: triton                                       optional (default torch)
    # PLAN: {"c": "fused"}                                 optional JSON plan for apply-plan
    # BUDGET: 0.05                                         optional error budget for choose-lowering
    # SIZES: {"seq": 4096}                                 optional sizes for choose-lowering
    <input program>
    # EXPECT:                                              the printed program after the steps
    <expected program>
    # EXPECT-ERROR: regex                                  instead: the one-line error the steps raise

Comment lines (``#`` then a space) are not part of either program.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import itnet_compiler as itc
from itnet_compiler.ir.target import get_target
from itnet_compiler.passes import pipeline
from itnet_compiler.passes.choose_lowering import ChooseOptions

CASES = sorted((Path(__file__).parent / "ir").glob("*.itir"))
HEADER = re.compile(r"# (RUN|TARGET|PLAN|BUDGET|SIZES|EXPECT-ERROR|EXPECT):\s*(.*)")


def load_case(path: Path) -> tuple[dict[str, str], str, str]:
    head: dict[str, str] = {}
    parts: dict[str, list[str]] = {"input": [], "expect": []}
    where = "input"
    for line in path.read_text().splitlines():
        m = HEADER.fullmatch(line.strip())
        if m:
            head[m.group(1)] = m.group(2).strip()
            if m.group(1) == "EXPECT":
                where = "expect"
            continue
        if line.startswith("# ") or line == "#":
            continue
        parts[where].append(line)
    assert "RUN" in head and ("EXPECT" in head or "EXPECT-ERROR" in head), f"{path.name}: needs RUN and EXPECT"
    return head, "\n".join(parts["input"]).strip() + "\n", "\n".join(parts["expect"]).strip() + "\n"


def run_case(head: dict[str, str], text: str) -> str:
    prog = itc.parse(text)
    choose = None
    if "BUDGET" in head:
        sizes = json.loads(head.get("SIZES", "{}"))
        choose = ChooseOptions(error_budget=float(head["BUDGET"]), sizes=sizes)
    ctx = pipeline.Context(
        target=get_target(head.get("TARGET", "torch")),
        plan=json.loads(head["PLAN"]) if "PLAN" in head else None,
        choose=choose,
    )
    steps = [pipeline.step(name.strip()) for name in head["RUN"].split(",")]
    return str(pipeline.run_steps(prog, steps, ctx))


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_pass_on_ir_text(path: Path) -> None:
    head, text, expected = load_case(path)
    if "EXPECT-ERROR" in head:
        with pytest.raises(itc.ItnetError, match=head["EXPECT-ERROR"]):
            run_case(head, text)
        return
    got = run_case(head, text)
    assert got == expected, f"{path.name}: got\n{got}"


def test_there_are_pass_cases_for_every_step() -> None:
    covered = {name.strip() for p in CASES for name in load_case(p)[0]["RUN"].split(",")}
    assert covered >= {s.name for s in pipeline.PIPELINE}, sorted({s.name for s in pipeline.PIPELINE} - covered)


def test_a_wrong_expectation_fails(tmp_path: Path) -> None:
    path = CASES[0]
    head, text, expected = load_case(path)
    assert run_case(head, text) != expected.replace("%", "%x_", 1)
