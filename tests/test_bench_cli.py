"""``itnet bench`` on a small BERT: the rows each invocation promises (itnet, eager, torch.compile, plans, backward),
ratios consistent with the times, a failing torch.compile as a row, and mistakes as one line. Never a timing race."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from itnet_compiler.benchmark import BACKWARD, FORWARD, bench
from itnet_compiler.cli import main

BERT_CONFIG = {
    "model_type": "bert",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 100,
    "max_position_embeddings": 64,
    "attn_implementation": "eager",
}


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bench")
    cfg = tmp / "bert.json"
    cfg.write_text(json.dumps(BERT_CONFIG))
    out = tmp / "bert.itir"
    assert (
        main(["convert", "hf:BertModel", "--config", str(cfg), "-o", str(out), "--input", "input_ids:2x8:int64"]) == 0
    )
    return out


def run_bench(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: object) -> tuple[dict, str]:
    out_json = tmp_path / "out.json"
    code = main(["bench", *[str(a) for a in argv], "--repeat", "2", "--json", str(out_json)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out_json.read_text()), out


def rows_by(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["name"], r["mode"]): r for r in report["rows"]}


def assert_consistent(report: dict) -> None:
    """Every measured row: positive times, and its ratio is its time over the baseline's in the same pass."""
    rows = rows_by(report)
    for (_, mode), r in rows.items():
        if r["error"]:
            continue
        base = rows[(report["baseline"], mode)]
        assert r["seconds"] > 0 and len(r["times"]) == 2 and all(t > 0 for t in r["times"]), r
        assert r["peak_bytes"] >= 0 and r["unit"] == "tokens" and r["work"] == 16
        assert math.isclose(r["ratio"], r["seconds"] / base["seconds"], rel_tol=1e-9)
        assert math.isclose(r["throughput"], 16 / r["seconds"], rel_tol=1e-9)


def test_bench_against_eager_and_torch_compile(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report, out = run_bench(capsys, tmp_path, bert, "--trust-source")
    assert set(rows_by(report)) == {("eager", FORWARD), ("torch.compile", FORWARD), ("itnet", FORWARD)}
    assert report["baseline"] == "eager" and report["inputs"] == {"input_ids": [2, 8]}
    assert_consistent(report)
    assert rows_by(report)[("eager", FORWARD)]["ratio"] == 1.0
    for needle in ("eager", "torch.compile", "itnet", "time ×eager", "tokens/s", "peak MiB"):
        assert needle in out


def test_bench_backward_and_plan_rows(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = (bert, "--trust-source", "--no-compile", "--backward", "--lowering", "*=fused")
    report, out = run_bench(capsys, tmp_path, *argv)
    names = {"eager", "itnet", "itnet plan"}
    assert set(rows_by(report)) == {(n, m) for n in names for m in (FORWARD, BACKWARD)}
    assert_consistent(report)
    assert rows_by(report)[("itnet plan", FORWARD)]["note"] == "2 fused"
    assert "itnet plan" in out and "2 fused" in out and BACKWARD in out
    assert not any(r["error"] for r in report["rows"])


def test_bench_without_source_times_only_itnet_builds(
    bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, out = run_bench(capsys, tmp_path, bert, "--lowering", "*=fused")
    assert set(rows_by(report)) == {("itnet", FORWARD), ("itnet plan", FORWARD)}
    assert report["baseline"] == "itnet" and "time ×itnet" in out and "eager" not in out
    assert_consistent(report)
    report, _ = run_bench(capsys, tmp_path, bert)
    assert [r["name"] for r in report["rows"]] == ["itnet"]


def test_failing_torch_compile_is_a_row(
    bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(model: torch.nn.Module) -> object:
        def call(*args: object, **kwargs: object) -> object:
            raise RuntimeError("inductor is unavailable here")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    report, out = run_bench(capsys, tmp_path, bert, "--trust-source")
    row = rows_by(report)[("torch.compile", FORWARD)]
    assert row["seconds"] is None and row["ratio"] is None and "inductor is unavailable here" in row["error"]
    assert "inductor is unavailable here" in out
    assert_consistent(report)


def test_bench_function_reports_failures_and_ratios() -> None:
    x = torch.randn(4, 8)
    lin = torch.nn.Linear(8, 8)

    def boom(t: torch.Tensor) -> torch.Tensor:
        raise ValueError("no")

    rows = bench({"lin": lin, "double": lambda t: lin(t) + lin(t), "boom": boom}, x, backward=True, repeat=2)
    by = {(r["name"], r["mode"]): r for r in rows}
    assert set(by) == {(n, m) for n in ("lin", "double", "boom") for m in (FORWARD, BACKWARD)}
    assert by[("boom", FORWARD)]["error"] == "ValueError: no" and by[("boom", FORWARD)]["ratio"] is None
    assert by[("double", BACKWARD)]["ratio"] == pytest.approx(
        by[("double", BACKWARD)]["seconds"] / by[("lin", BACKWARD)]["seconds"]
    )
    assert by[("lin", FORWARD)]["unit"] == "examples" and by[("lin", FORWARD)]["work"] == 4
    assert lin.weight.grad is not None  # the backward pass ran


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["bench", "missing.itir"], "no such bundle"),
        (["bench", "BERT", "--repeat", "0"], "--repeat 0"),
        (["bench", "BERT", "--lowering", "nonsense"], "is not glob=spec"),
    ],
)
def test_bench_mistakes_are_one_line(
    argv: list[str], needle: str, bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([str(bert) if a == "BERT" else a for a in argv])
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("itnet: error: ") and needle in lines[0], err
