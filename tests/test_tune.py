"""``itc.tune`` / ``itnet tune``: budget 0 keeps every layer exact; a CNN whose middle convolution has a low-rank
weight gets an approximation there and stays within the budget on held-out inputs (checked against the eager model);
plans round-trip, are reused by ``build`` and ``itnet run/bench --plan``, and a stale or corrupt plan is one error.
Every option value the tuner may try has a cost (the cost model prunes by it). No timing is asserted except that
the chosen approximation was measured faster than the exact lowering it replaces, which the tuner itself requires."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from models import gpt2

import itnet_compiler as itc
from itnet_compiler import tuner
from itnet_compiler.cli import main
from itnet_compiler.errors import ItnetError
from itnet_compiler.ir.cost import cost_of
from itnet_compiler.ir.lowering import REGISTRY, LoweringSpec
from itnet_compiler.plan import Plan

TUNE = {"repeat": 2, "keep": 4, "per_layer": 2}


class LowRankCNN(nn.Module):
    """conv → conv (weight of channel rank 6: its SVD lowering at rank 8 is exact and ~10× cheaper) → 1×1 head."""

    def __init__(self, c: int = 96, rank: int = 6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        with torch.no_grad():
            u, v = torch.randn(c, rank, generator=g), torch.randn(rank, c * 9, generator=g)
            self.conv.weight.copy_((u @ v).reshape(c, c, 3, 3) / (c * 9) ** 0.5)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(torch.relu(self.inp(x)))))


def images(seed: int, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = LowRankCNN().eval()
    return model, itc.convert(model, (images(0),))


@pytest.fixture(scope="module")
def cnn_plan(cnn) -> Plan:
    _, prog = cnn
    return itc.tune(prog, [(images(1),)], budget=0.05, held_out=[(images(2),)], **TUNE)


def test_budget_zero_measures_and_picks_only_exact_lowerings(cnn):
    model, prog = cnn
    plan = itc.tune(prog, [(images(1),)], budget=0.0, **TUNE)
    for layer, m in plan.measurements.items():
        assert m["candidates"], layer
        assert all(r["exact"] for r in m["candidates"]), m["candidates"]
        assert REGISTRY[("stationary", LoweringSpec.parse(m["chosen"]).name)].exact
    with torch.no_grad():
        got = itc.build(prog, plan=plan)(images(3))
        assert rel(got, model(images(3))) < 1e-5


def test_low_rank_layer_gets_an_approximation_within_the_budget(cnn, cnn_plan):
    model, prog = cnn
    chosen = cnn_plan.measurements["conv"]
    assert chosen["chosen"].startswith("lowrank"), chosen
    assert chosen["chosen_seconds"] < chosen["exact_seconds"]
    assert cnn_plan.end_to_end["held_out"] and cnn_plan.end_to_end["error"] <= 0.05
    module = itc.build(prog, plan=cnn_plan)
    assert module.program.transforms[1].lowering.startswith("lowrank")
    with torch.no_grad():
        for seed in (7, 8):  # inputs neither the tuner nor its check saw, against the eager model
            assert rel(module(images(seed)), model(images(seed))) <= 0.05


def test_an_approximation_past_the_budget_is_not_chosen(cnn):
    _, prog = cnn
    plan = itc.tune(prog, [(images(1),)], budget=1e-4, **TUNE)
    for layer, m in plan.measurements.items():
        cand = next(r for r in m["candidates"] if r["spec"] == m["chosen"])
        assert cand["exact"] or cand["end_to_end"] <= 1e-4, (layer, cand)
    assert plan.end_to_end["error"] <= 1e-4


def test_plan_round_trip_and_reuse(cnn, cnn_plan, tmp_path):
    model, prog = cnn
    path = tmp_path / "plan.json"
    cnn_plan.save(path)
    loaded = Plan.load(path)
    assert loaded.to_json() == json.loads(json.dumps(cnn_plan.to_json()))
    with torch.no_grad():
        from_file = itc.build(prog, plan=str(path))(images(5))
        from_layers = itc.build(prog, plan=dict(cnn_plan.layers))(images(5))
    assert torch.equal(from_file, from_layers)
    reloaded = itc.load(_saved(prog, tmp_path / "m.itir"))
    assert itc.build(reloaded, plan=path).program.transforms[1].lowering == cnn_plan.measurements["conv"]["chosen"]


def _saved(prog: itc.Program, path: Path) -> Path:
    prog.save(str(path))
    return path


def _edited(plan: Plan, tmp_path: Path, edit) -> Path:
    data = json.loads(json.dumps(plan.to_json()))
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda d: d.update(device="NVIDIA H100 80GB HBM3"), "device"),
        (lambda d: d["versions"].update(torch="1.0.0"), "versions torch 1.0.0"),
        (lambda d: d.update(program="0" * 32), "the program"),
        (lambda d: d.update(backend="triton"), "backend triton"),
    ],
)
def test_a_stale_plan_is_refused_saying_what_differs(cnn, cnn_plan, tmp_path, edit, says):
    _, prog = cnn
    path = _edited(cnn_plan, tmp_path, edit)
    with pytest.raises(ItnetError, match="tuned elsewhere") as e:
        itc.build(prog, plan=str(path))
    assert says in str(e.value) and "--retune" in str(e.value) and "\n" not in str(e.value)


def test_changed_weights_make_the_plan_stale(cnn, cnn_plan):
    model, _ = cnn
    other = LowRankCNN().eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.head.bias.add_(1e-3)  # same structure, one weight changed
    with pytest.raises(ItnetError, match="the program"):
        itc.build(itc.convert(other, (images(0),)), plan=cnn_plan)


def test_a_plan_tuned_at_one_size_refuses_another(tmp_path):
    case = gpt2("eager", dynamic=True)
    prog = itc.convert(case.model.eval(), case.args, case.kwargs, dynamic_shapes=case.dynamic_shapes)
    plan = itc.tune(prog, [case.inputs_at(16)[1]], budget=0.0, **TUNE)
    assert plan.sizes == {"seq": 16}
    module = itc.build(prog, plan=plan)
    with torch.no_grad():
        want = case.model(**case.inputs_at(16)[1]).last_hidden_state
        assert rel(module(**case.inputs_at(16)[1]).last_hidden_state, want) < 1e-5
        with pytest.raises(ItnetError, match=r"tuned at other sizes: seq=24 \(tuned at 16\)"):
            module(**case.inputs_at(24)[1])


@pytest.mark.parametrize(
    "text",
    ["{not json", "[1, 2]", json.dumps({"format": 99, "program": "x"}),
     json.dumps({"format": 1, "program": "x", "layers": {"a": 3}, "budget": 0.1, "backend": "torch",
                 "device": "cpu", "versions": {}, "sizes": {}}),
     json.dumps({"format": 1, "program": "x"})],
)  # fmt: skip
def test_a_corrupt_plan_file_is_one_error(cnn, tmp_path, capsys, text):
    _, prog = cnn
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ItnetError) as e:
        Plan.load(path)
    assert "\n" not in str(e.value)
    bundle = _saved(prog, tmp_path / "m.itir")
    assert main(["run", str(bundle), "--plan", str(path)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("itnet: error:") and len(err.strip().splitlines()) == 1


def test_time_limit_zero_keeps_every_layer_exact_and_says_so(cnn):
    _, prog = cnn
    plan = itc.tune(prog, [(images(1),)], budget=0.5, time_limit=0.0, **TUNE)
    assert all(m["chosen"] == m["exact"] for m in plan.measurements.values())
    assert any("time limit" in n for n in plan.notes)


def test_every_value_the_tuner_tries_has_a_cost(cnn):
    """The cost model prunes by each candidate's predicted time: every candidate of every family here costs."""
    _, conv_prog = cnn
    case = gpt2("sdpa")
    attn_prog = itc.convert(case.model.eval(), case.args, case.kwargs)
    planned = [itc.plan_program(p, None, "torch") for p in (conv_prog, attn_prog)]
    families = set()
    for p in planned:
        for node in p.transforms:
            specs = tuner.candidate_specs(node, "torch", budget=1.0)
            assert len(specs) > 3, node.family
            for spec in specs:
                assert cost_of(node, spec) is not None, (node.family, spec)
            families.add(node.family)
            tuner.prune(node, specs, {"seq": 4096}, 1e-2, keep=4)
    assert families == {"stationary", "dot_exp"}


def test_allocation_and_back_off_follow_the_measurements():
    """The budget goes where time saved per unit of squared error is largest; back-off undoes the cheapest."""

    def row(spec: str, secs: float, err: float, exact: bool = False) -> dict:
        return {"spec": spec, "seconds": secs, "end_to_end": err, "exact": exact}

    frontier = {
        "a": [row("a1", 1.0, 0.03), row("a0", 5.0, 0.0, True)],  # saves 4 s for 9e-4
        "b": [row("b1", 2.0, 0.03), row("b0", 3.0, 0.0, True)],  # saves 1 s for 9e-4
    }
    choice = tuner._allocate(frontier, budget=0.035)  # room for one of them (0.03² + 0.03² > 0.035²)
    assert choice == {"a": 0, "b": 1}
    both = tuner._allocate(frontier, budget=0.05)
    assert both == {"a": 0, "b": 0}
    assert tuner._back_off(frontier, both) == "b" and both == {"a": 0, "b": 1}
    assert tuner._back_off(frontier, both) == "a" and tuner._back_off(frontier, both) is None


def test_cli_tune_report_run_and_bench(cnn, tmp_path, capsys):
    _, prog = cnn
    bundle = _saved(prog, tmp_path / "m.itir")
    plan_file, report = tmp_path / "plan.json", tmp_path / "report.html"
    argv = ["tune", str(bundle), "--budget", "0.05", "--repeat", "2", "--keep", "4", "--per-layer", "2",
            "-o", str(plan_file), "--report", str(report)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "chosen" in out and "end to end" in out and "lowrank" in out
    plan = Plan.load(plan_file)
    assert plan.layers["conv"].startswith("lowrank") and plan.end_to_end["error"] <= 0.05
    page = report.read_text()
    assert page.count("<img src='data:image/png;base64,") == 1 + len(plan.measurements)
    assert all(f"<h2>{layer}</h2>" in page for layer in plan.measurements)

    assert main(argv[:-2]) == 0  # a current plan is kept
    assert "current plan" in capsys.readouterr().out
    assert main(["run", str(bundle), "--plan", str(plan_file)]) == 0
    assert "lowrank" in capsys.readouterr().out
    out_json = tmp_path / "bench.json"
    assert main(["bench", str(bundle), "--plan", str(plan_file), "--repeat", "2", "--json", str(out_json)]) == 0
    rows = {r["name"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert "lowrank" in rows["itnet plan"]["note"] and math.isfinite(rows["itnet plan"]["seconds"])
    capsys.readouterr()
    assert main(["run", str(bundle), "--plan", str(plan_file), "--lowering", "conv=dense"]) != 0
    assert "tuned plan" in capsys.readouterr().err


def test_cli_tune_mistakes_are_one_line(cnn, tmp_path, capsys):
    _, prog = cnn
    bundle = _saved(prog, tmp_path / "m.itir")
    for argv in (["--budget", "-1"], ["--budget", "nan"], ["--calib", "0"], ["--calib-data", str(tmp_path / "no")]):
        assert main(["tune", str(bundle), *argv, "-o", str(tmp_path / "p.json")]) != 0
        err = capsys.readouterr().err
        assert err.startswith("itnet: error:") and len(err.strip().splitlines()) == 1, err
