"""MLIR through torch-mlir (every dialect parses back in torch-mlir's context) and self-contained Triton bundles
(loaded in a fresh process that never imports itnet, run under the Triton interpreter, compared with the torch
backend; kernels compiled ahead of time for sm_90 on this CPU); ``itnet export`` from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import itnet_compiler as itc
from itnet_compiler.export.mlir import parse_back

DIALECT_OPS = {"torch": "torch.aten.", "linalg": "linalg.", "stablehlo": "stablehlo.", "tosa": "tosa."}


# torch-mlir lowers a dynamic BERT to torch, linalg and stablehlo; its TOSA conversion needs static shapes.
MLIR_CASES = [("encoder-causal", d) for d in DIALECT_OPS] + [
    ("bert-sdpa-dyn", d) for d in ("torch", "linalg", "stablehlo")
]


@pytest.mark.parametrize(("case", "dialect"), MLIR_CASES, indirect=["case"])
def test_mlir_dialects_parse_back(case, prog, dialect, tmp_path) -> None:
    path = tmp_path / "m.mlir"
    text = itc.export_mlir(prog, path, dialect=dialect)
    assert path.read_text() == text and DIALECT_OPS[dialect] in text
    parse_back(path.read_text())
    if prog.symbols and dialect in ("torch", "linalg"):
        assert "?" in text, "the dynamic length should stay dynamic"


def test_mlir_refusal_names_the_dialect(zoo) -> None:
    from models import FACTORIES

    case = zoo.memo(("case", "cnn"), FACTORIES["cnn"])
    prog = itc.convert(case.model, case.args)
    with pytest.raises(itc.ItnetError, match="tosa dialect") as err:
        itc.export_mlir(prog, dialect="tosa")  # torch-mlir has no TOSA lowering of transposed convolution
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ Triton bundles
_EXPORT = """
import os, sys, json, torch
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, {tests!r})
import itnet_compiler as itc
case_name, out = sys.argv[1], sys.argv[2]
if case_name in ("lstm", "gru", "mamba2"):
    from test_recurrent import CASES
    case = CASES[case_name](); args = case.inputs(11)
    prog = itc.convert(case.model, args, dynamic_shapes=case.dynamic)
    kwargs = {{}}
    sizes = {{s: 11 for s in prog.symbols}}
else:
    from models import FACTORIES
    case = FACTORIES[case_name](); args, kwargs = case.args, case.kwargs
    prog = itc.convert(case.model, args, kwargs)
    sizes = None
manifest = itc.export_triton(prog, out, target=sys.argv[3] if len(sys.argv) > 3 else None, sizes=sizes)
import torch.utils._pytree as pytree
flat = pytree.tree_flatten((tuple(args), kwargs))[0]
ref = pytree.tree_flatten(itc.build(prog)(*args, **kwargs))[0]
torch.save({{"inputs": flat, "ref": [r.detach() for r in ref]}}, os.path.join(out, "_check.pt"))
"""

_LOAD = """
import os, sys, json
os.environ["TRITON_INTERPRET"] = "1"
import torch
sys.path.insert(0, sys.argv[1])
import itnet_bundle
model = itnet_bundle.load(sys.argv[1])
data = torch.load(os.path.join(sys.argv[1], "_check.pt"))
out = model(*data["inputs"])
errs = [float((o - r).abs().max() / max(float(r.abs().max()), 1e-30)) for o, r in zip(out, data["ref"])]
print(json.dumps({"errs": errs, "itnet_imported": any(m.startswith("itnet_compiler") for m in sys.modules)}))
"""


def _fresh(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.parametrize("name", ["encoder-causal", "cnn", "gpt2-sdpa", "lstm", "gru", "mamba2"])
def test_triton_bundle_runs_without_itnet(name, tmp_path) -> None:
    tests = os.path.dirname(os.path.abspath(__file__))
    out = tmp_path / "bundle"
    done = _fresh(textwrap.dedent(_EXPORT.format(tests=tests)), name, str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kernels"] and all((out / "kernels" / k["file"]).exists() for k in manifest["kernels"])
    assert all(
        {"name", "signature", "grid", "constexprs", "num_warps", "num_stages"} <= set(k) for k in manifest["kernels"]
    )
    ran = _fresh(_LOAD, str(out))
    assert ran.returncode == 0, ran.stderr[-2000:]
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    assert not result["itnet_imported"], "loading a bundle must not import itnet"
    assert result["errs"] and max(result["errs"]) <= 1e-4, result["errs"]


def test_triton_bundle_compiles_for_sm90(tmp_path) -> None:
    tests = os.path.dirname(os.path.abspath(__file__))
    out = tmp_path / "bundle"
    done = _fresh(textwrap.dedent(_EXPORT.format(tests=tests)), "encoder-causal", str(out), "sm_90")
    assert done.returncode == 0, done.stderr[-2000:]
    index = json.loads((out / "binaries" / "index.json").read_text())
    assert index and all(e["target"] == "sm_90" for e in index)
    for e in index:
        assert (out / "binaries" / e["file"]).read_bytes()[:4] == b"\x7fELF"  # a cubin is an ELF image


def test_delegated_lowerings_are_recorded_as_torch_ops(tmp_path, zoo) -> None:
    """The Triton target runs ``dense`` on torch by design: its ATen ops are recorded, no kernel is needed."""
    from models import FACTORIES

    from itnet_compiler.export.triton_bundle import load_launcher

    c = zoo.memo(("case", "encoder-plain"), FACTORIES["encoder-plain"])
    prog = itc.convert(c.model, c.args, c.kwargs)
    manifest = itc.export_triton(prog, tmp_path / "b", plan={"*": "dense"})
    assert manifest["kernels"] == []
    got = load_launcher(tmp_path / "b").load(tmp_path / "b")(*c.args)[0]
    want = itc.build(prog)(*c.args)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_export_writes_each_format(tmp_path, capsys) -> None:
    from itnet_compiler.cli import main

    bundle = tmp_path / "m.itir"
    assert main(["convert", "examples/cnn.py:make_model", "-o", str(bundle)]) == 0
    assert main(["export", str(bundle), "--onnx", str(tmp_path / "m.onnx"), "--keep-transforms", "--opset", "23"]) == 0
    out = capsys.readouterr().out
    assert "itnet-domain transform calls" in out and "full_check" in out
    assert main(["export", str(bundle), "--mlir", str(tmp_path / "m.mlir"), "--dialect", "linalg"]) == 0
    assert "linalg." in (tmp_path / "m.mlir").read_text()
    assert main(["export", str(bundle)]) != 0
    assert "say what to write" in capsys.readouterr().err
    assert main(["export", str(bundle), "--onnx", str(tmp_path / "x.onnx"), "--opset", "9"]) != 0
    assert "opset 9" in capsys.readouterr().err


def test_bundle_launcher_refuses_kernel_files_that_run_host_code(tmp_path) -> None:
    from itnet_compiler.export.launcher_source import LAUNCHER

    (tmp_path / "itnet_bundle.py").write_text(LAUNCHER)
    from itnet_compiler.export.triton_bundle import load_launcher

    launcher = load_launcher(tmp_path)
    good = tmp_path / "good.py"
    good.write_text("import triton\nimport triton.language as tl\n\n\n@triton.jit\ndef k(X, N: tl.constexpr):\n"
                    "    tl.store(X + tl.arange(0, N), tl.zeros([N], tl.float32))\n")  # fmt: skip
    launcher._check_kernel_source(good)
    hostile = {
        "import os\n": "imports",
        "import triton\nprint('hi')\n": "runs code",
        "import triton\n\n@triton.jit\ndef k(X):\n    __import__('os').system('true')\n": "__import__",
        "import triton\n\ndef k(X):\n    pass\n": "not a @triton.jit",
        "import triton\n\n@triton.jit\ndef k(X):\n    x = X.__class__\n": "__class__",
    }
    for i, (text, why) in enumerate(hostile.items()):
        bad = tmp_path / f"bad{i}.py"
        bad.write_text(text)
        with pytest.raises(ValueError, match=why):
            launcher._check_kernel_source(bad)
