"""The ``itnet`` command line: convert / inspect / run in-process through ``main``, one real ``python cli.py`` call,
and every user mistake as one line on stderr with a non-zero exit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import itnet_compiler as itc
from itnet_compiler.cli import main

ROOT = Path(__file__).resolve().parent.parent
CNN_SPEC = f"{ROOT / 'examples' / 'cnn.py'}:make_model"
BERT_CONFIG = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 100,
    "max_position_embeddings": 64,
    "attn_implementation": "eager",
}

SMALL_MODULE = """
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv1d(channels, 8, 3, padding=1)
        self.proj = nn.Linear(8, 2)

    def forward(self, x):
        return self.proj(torch.relu(self.conv(x)).transpose(1, 2))


def make(channels: int = 4):
    return Small(channels), {"x": torch.randn(2, channels, 20)}


def not_a_model():
    return [1, 2]
"""


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("itnet: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def max_rel_error(out: str) -> float:
    m = re.search(r"^max relative error (\S+)", out, re.M)
    assert m, out
    return float(m.group(1))


@pytest.fixture(scope="module")
def cnn_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "cnn.itir"
    assert main(["convert", CNN_SPEC, "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def bert_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tmp / "bert.json"
    cfg.write_text(json.dumps(BERT_CONFIG))
    out = tmp / "bert.itir"
    # No range for seq: torch.export's suggested range (max_position_embeddings) is adopted and noted.
    argv = ["convert", "hf:BertModel", "--config", str(cfg), "-o", str(out), "--dynamic", "input_ids:1=seq"]
    assert main(argv) == 0
    return out


# ---------------------------------------------------------------------------------------------- convert / inspect / run


def test_convert_cnn_writes_bundle_and_summary(cnn_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert {p.name for p in cnn_bundle.iterdir()} == {"program.itir", "weights.safetensors", "meta.json"}
    meta = json.loads((cnn_bundle / "meta.json").read_text())
    assert meta["source"]["spec"] == CNN_SPEC and meta["source"]["seed"] == 0
    code, out, _ = run_cli(capsys, "convert", CNN_SPEC, "-o", cnn_bundle)
    assert code == 0
    assert "10 stationary" in out and "generic ops: 9" in out and str(cnn_bundle) in out


def test_inspect_cnn_lists_layers_families_and_generic_ops(
    cnn_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "inspect", cnn_bundle, "--cost")
    assert code == 0
    for layer in ("stem", "grouped", "depthwise", "up_grouped", "seq", "vol"):
        assert re.search(rf"│ {layer}\s+│ stationary", out), layer
    assert re.search(r"aten\.relu\.default\s+│\s+3", out)
    assert "groups 32, pad reflect" in out and "442368" in out
    assert "total: 10 transforms (stationary 10), 9 generic ops" in out


def test_run_check_cnn(cnn_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--check", "--trust-source", "--lowering", "*=dense", "--seed", "3")
    code, out, _ = run_cli(capsys, "run", cnn_bundle, *args)
    assert code == 0
    assert "10 dense" in out and "output 0: f32[2, 10]" in out
    assert max_rel_error(out) < 1e-5


def test_hf_bert_convert_inspect_run(bert_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta = json.loads((bert_bundle / "meta.json").read_text())
    assert meta["source"]["ranges"] == {"seq": [None, 64]}
    assert meta["source"]["config"] == BERT_CONFIG and meta["source"]["inputs"] == ["input_ids:2x16:int64"]
    assert meta["example"]["sizes"] == {"seq": 16}
    code, out, _ = run_cli(capsys, "inspect", bert_bundle)
    assert code == 0
    for i in (0, 1):
        assert re.search(rf"encoder\.layer\.{i}\.attention\.self\s+│ dot_exp", out)
    assert "seq[seq]←seq[seq]" in out and "256*seq**2" in out and "seq in [0, 64]" in out
    assert "aten.linear.default" in out and "aten.layer_norm.default" in out
    code, out, err = run_cli(capsys, "run", bert_bundle, "--check", "--trust-source", "--input", "input_ids:2x24:int64")
    assert code == 0, err
    assert "output 0: f32[2, 24, 32]" in out
    assert max_rel_error(out) < 1e-5


def test_module_spec_with_symbolic_input(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "itnet_cli_small.py").write_text(SMALL_MODULE)
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "small.itir"
    argv = ["convert", "itnet_cli_small:make", "-o", out_dir, "--input", "x:2x4xseq=24:float32"]
    code, out, err = run_cli(capsys, *argv, "--dynamic", "x:2=seq:4:128")
    assert code == 0, err
    assert "1 stationary" in out and "seq in [4, 128]" in out
    code, out, err = run_cli(capsys, "run", out_dir, "--check", "--trust-source")
    assert code == 0, err
    assert "output 0: f32[2, 24, 2]" in out and max_rel_error(out) < 1e-5


def test_file_spec_config_is_passed_to_the_factory(
    small_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "small.json"
    cfg.write_text('{"channels": 3}')
    out_dir = tmp_path / "small.itir"
    code, _, err = run_cli(capsys, "convert", f"{small_file}:make", "--config", cfg, "-o", out_dir)
    assert code == 0, err
    code, out, err = run_cli(capsys, "run", out_dir, "--check", "--trust-source")
    assert code == 0, err
    assert "output 0: f32[2, 20, 2]" in out and max_rel_error(out) < 1e-5


def test_hf_vision_default_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "vit.json"
    vit = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg.write_text(json.dumps(vit | {"intermediate_size": 64, "image_size": 16, "patch_size": 8, "num_channels": 3}))
    code, out, err = run_cli(capsys, "convert", "hf:ViTModel", "--config", cfg, "-o", tmp_path / "vit.itir")
    assert code == 0, err
    assert "1 dot_exp, 1 stationary" in out
    meta = json.loads((tmp_path / "vit.itir" / "meta.json").read_text())
    assert meta["source"]["inputs"] == ["pixel_values:2x3x16x16:float32"]


def test_check_detects_a_wrong_program(cnn_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.itir"
    shutil.copytree(cnn_bundle, bad)
    text = (bad / "program.itir").read_text()
    assert "aten.relu.default" in text
    (bad / "program.itir").write_text(text.replace("aten.relu.default", "aten.gelu.default", 1))
    code, _, err = run_cli(capsys, "run", bad, "--check", "--trust-source")
    assert_one_line_error(code, err, "max relative error")


def test_subprocess_python_cli_py(cnn_bundle: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "cli.py", "inspect", str(cnn_bundle), "--cost"]
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "up_grouped" in res.stdout and "aten.cat.default" in res.stdout and "MFLOP" in res.stdout


# ---------------------------------------------------------------------------------------------- user mistakes


@pytest.fixture()
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "small_models.py"
    path.write_text(SMALL_MODULE)
    (tmp_path / "notes.txt").write_text("not python\n")
    return path


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["convert", "{tmp}/nope.py:make", "-o", "{tmp}/o"], "does not exist"),
        (["convert", "examples/cnn.py", "-o", "{tmp}/o"], "no ':factory'"),
        (["convert", "no_such_pkg_xyz.models:make", "-o", "{tmp}/o"], "no module named 'no_such_pkg_xyz.models'"),
        (["convert", "{small}:missing_factory", "-o", "{tmp}/o"], "no factory 'missing_factory'"),
        (["convert", "{small}:not_a_model", "-o", "{tmp}/o"], "not a torch.nn.Module"),
        (["convert", "{tmp}/notes.txt:make", "-o", "{tmp}/o"], "not a Python module"),
        (["convert", "{small}:make", "-o", "{tmp}/o", "--input", "x"], "is not name:shape:dtype"),
        (["convert", "{small}:make", "-o", "{tmp}/o", "--input", "x:2x4-1:float32"], "neither a number nor a symbol"),
        (["convert", "{small}:make", "-o", "{tmp}/o", "--input", "x:2x4x8:floaty"], "unknown dtype 'floaty'"),
        (["convert", "{small}:make", "-o", "{tmp}/o", "--dynamic", "x=seq"], "is not name:dim"),
        (["convert", "{small}:make", "-o", "{tmp}/o", "--dynamic", "y:2=seq:4:64"], "--dynamic names input(s) ['y']"),
        (["convert", "hf:BertModel", "-o", "{tmp}/o"], "needs --config"),
        (["convert", "hf:NoSuchModelXyz", "--config", "{tmp}/cfg.json", "-o", "{tmp}/o"], "no model class"),
        (["convert", "{small}:make"], "required: -o/--output"),
        (["convert", "{small}:make", "-o", "{tmp}/o", "--config", "{tmp}/missing.json"], "does not exist"),
        (["inspect", "{tmp}/missing.itir"], "no such bundle"),
        (["frobnicate"], "invalid choice"),
        ([], "choose a command"),
    ],
)
def test_user_mistakes_are_one_line(
    argv: list[str], needle: str, tmp_path: Path, small_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps(BERT_CONFIG))
    argv = [a.format(tmp=tmp_path, small=small_file) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle)


def test_wrong_input_shape_at_run_time(cnn_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "run", cnn_bundle, "--input", "x:1x3x16x16:float32")
    assert_one_line_error(code, err, "input 'x'", "f32[2,3,32,32]")
    code, _, err = run_cli(capsys, "run", cnn_bundle, "--input", "w:1x3:float32")
    assert_one_line_error(code, err, "no such input")
    code, _, err = run_cli(capsys, "run", cnn_bundle, "--lowering", "fused")
    assert_one_line_error(code, err, "is not glob=spec")
    code, _, err = run_cli(capsys, "run", cnn_bundle, "--lowering", "no_such_layer=dense")
    assert_one_line_error(code, err, "match no transform layer")


def test_malformed_ir_shows_line_and_column(
    cnn_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.itir"
    shutil.copytree(cnn_bundle, bad)
    lines = (bad / "program.itir").read_text().splitlines()
    lines[3] = lines[3].replace(":", " ?", 1)
    (bad / "program.itir").write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, "inspect", bad)
    assert_one_line_error(code, err, "malformed IR", "line 4, column")


def test_check_without_source_meta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3)).eval()
    bundle = tmp_path / "api.itir"
    itc.convert(model, (torch.randn(1, 2, 8, 8),)).save(str(bundle))
    code, out, err = run_cli(capsys, "run", bundle)
    assert code == 0, err
    assert "output 0: f32[1, 3, 6, 6]" in out
    code, _, err = run_cli(capsys, "run", bundle, "--check", "--trust-source")
    assert_one_line_error(code, err, "records no source model")


def test_run_on_triton_records_fallbacks_that_inspect_shows(tmp_path, capsys):
    """The Triton backend (through the interpreter in CI) runs a small model whose float64 convolution has no kernel:
    `run` reports the fallback, records it in the bundle, and `inspect` shows it."""
    bundle = tmp_path / "small.itir"
    spec = f"{tmp_path / 'small.py'}:make"
    (tmp_path / "small.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a = torch.nn.Conv1d(4, 4, 3, padding=1, groups=4)\n"
        "        self.b = torch.nn.Conv1d(4, 2, 1).double()\n"
        "    def forward(self, x):\n"
        "        return self.b(self.a(x).double())\n"
        "def make():\n"
        "    return M().eval(), (torch.randn(1, 4, 8),)\n"
    )
    assert main(["convert", spec, "-o", str(bundle)]) == 0
    capsys.readouterr()
    with pytest.warns(UserWarning, match="layer 'b' runs on the torch backend"):
        assert main(["run", str(bundle), "--backend", "triton", "--check", "--trust-source"]) == 0
    out = capsys.readouterr().out
    assert "fallback b: runs on the torch backend (dtype torch.float64)" in out
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "fallback (triton run): b ran on the torch backend" in out
