"""A bundle someone sends you: nothing in it runs, hostile text and files fail as one clean line, declared types are
checked. Each case reproduces a finding of issue 9 (probed as an attacker and as a careless user would)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import itnet_compiler as itc
from itnet_compiler.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMALL = """import torch
from torch import nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def make():
    return Small(), (torch.randn(2, 4, 16),)
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle written by ``itnet convert`` (a Conv1d + relu model from a file spec)."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "small.py").write_text(SMALL)
    out = root / "small.itir"
    assert main(["convert", f"{root / 'small.py'}:make", "-o", str(out)]) == 0
    return out


@pytest.fixture()
def copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b.itir"
    shutil.copytree(bundle, dst)
    return dst


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("itnet: error: "), err
    return lines[0]


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def edit(b: Path, old: str, new: str, count: int = 1) -> None:
    text = (b / "program.itir").read_text()
    assert old in text, old
    (b / "program.itir").write_text(text.replace(old, new, count))


# ---------------------------------------------------------------------------------------------- code execution


@pytest.mark.parametrize(
    "op",
    [
        "builtins.eval",
        "builtins.exec",
        "builtins.__import__",
        "builtins.open",
        "builtins.getattr",
        "builtins.compile",
        "operator.attrgetter",
        "operator.methodcaller",
        "math.factorial",
        "os.system",
        "torch.load",
        "aten.from_file.default",
        "aten._print.default",
        "profiler._record_function_enter.default",
    ],
)
def test_a_program_cannot_name_a_callable_off_the_allow_list(
    op: str, copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    canary = tmp_path / "pwned"
    payload = json.dumps(f"open({str(canary)!r}, 'w').write('x')")
    text = (copy / "program.itir").read_text()
    lines = text.splitlines()
    out_at = next(i for i, ln in enumerate(lines) if ln.startswith("output"))
    lines.insert(out_at, f"%pwn = {op}({payload}) : int")
    (copy / "program.itir").write_text("\n".join(lines) + "\n")
    with pytest.raises(itc.ItnetError, match="allow-list|unknown op|never run"):
        itc.build(itc.load(copy))
    code, _, err = cli(capsys, "run", copy)
    assert code == 1 and "itnet: error:" in one_line(err)
    assert not canary.exists()


def test_allowed_ops_still_resolve() -> None:
    from itnet_compiler.ir.ops import resolve_op

    assert resolve_op("aten.add.Tensor") is torch.ops.aten.add.Tensor
    assert resolve_op("operator.floordiv")(7, 2) == 3
    assert resolve_op("math.ceil")(2.5) == 3
    with pytest.raises(ValueError, match="beyond 64 bits"):
        resolve_op("operator.pow")(9, 10**9)  # refused before it runs for hours


def test_check_never_rebuilds_the_source_from_the_bundle_silently(
    copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    canary = tmp_path / "pwned"
    meta = json.loads((copy / "meta.json").read_text())
    meta["source"] = {"spec": "os:system", "config": {"command": f"touch {canary}"}}
    (copy / "meta.json").write_text(json.dumps(meta))
    code, _, err = cli(capsys, "run", copy, "--check")
    assert code == 1 and "--trust-source" in one_line(err)
    assert not canary.exists()


def test_check_with_a_source_the_user_names(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "run", bundle, "--check", "--source", f"{bundle.parent / 'small.py'}:make")
    assert code == 0, err
    assert "max relative error" in out


def test_a_model_file_in_the_bundle_cannot_end_a_check_with_success(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (copy / "model.py").write_text("raise SystemExit(0)\ndef make():\n    pass\n")
    meta = json.loads((copy / "meta.json").read_text())
    meta["source"] = {"spec": f"{copy / 'model.py'}:make", "path": str(copy / "model.py")}
    (copy / "meta.json").write_text(json.dumps(meta))
    code, _, err = cli(capsys, "run", copy, "--check", "--trust-source")  # even when trusted, exit() is an error
    assert code == 1 and "called exit" in one_line(err)


@pytest.mark.parametrize("where", ["type", "context"])
def test_signature_types_are_never_imported_from_the_bundle(
    where: str, copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = tmp_path / "pwned"
    (copy / "payload.py").write_text(f"open({str(canary)!r}, 'w').write('x')\nclass Evil(tuple):\n    pass\n")
    monkeypatch.syspath_prepend(str(copy))  # even importable, it is not imported
    text = (copy / "program.itir").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("signature out "))
    if where == "type":
        spec = {"type": "payload.Evil", "context": None, "children": ["*"]}
    else:
        spec = {"type": "collections.namedtuple", "context": {"type": "payload.Evil"}, "children": ["*"]}
    edit(copy, line, "signature out " + json.dumps(spec))
    with pytest.raises(itc.ItnetError, match="does not rebuild|namedtuple"):
        itc.build(itc.load(copy))
    assert not canary.exists()


def test_namedtuple_outputs_are_rebuilt_from_their_fields() -> None:
    import collections

    Out = collections.namedtuple("Out", ["y", "z"])

    class M(torch.nn.Module):
        def forward(self, x):
            return Out(torch.relu(x), x * 2)

    x = torch.randn(3, 4)
    prog = itc.parse(str(itc.convert(M(), (x,))))
    got = itc.build(prog)(x)
    assert type(got).__name__ == "Out" and got._fields == ("y", "z")
    assert torch.equal(got.y, torch.relu(x)) and torch.equal(got.z, x * 2)


# ---------------------------------------------------------------------------------------------- hostile text

BOMBS = [
    ("f32[2,4,16]", "f32[9**9**9,4,16]", "exponent"),
    ("f32[2,4,16]", "f32[(2**31)**(2**31),4,16]", "exponent"),
    ("f32[2,4,16]", "f32[2**100000,4,16]", "exponent"),
    ("f32[2,4,16]", "f32[2**64,4,16]", "64 bits"),
    ("f32[2,4,16]", "f32[99999999999999999999999,4,16]", "64 bits"),
    ("f32[2,4,16]", "f32[Mod(2, 0),4,16]", "zero"),
    ("f32[2,4,16]", "f32[ceiling(2/0),4,16]", "zero"),
    ("f32[2,4,16]", "f32[" + "(" * 10_000 + "2" + ")" * 10_000 + ",4,16]", "longer than"),
    ("f32[2,4,16]", "f32[" + "(" * 40 + "2" + ")" * 40 + ",4,16]", "nested deeper"),
    ("f32[2,4,16]", "f32[" + "-" * 50 + "2,4,16]", "nested deeper"),
    ("f32[2,4,16]", "f32[" + ",".join(["1"] * 100) + "]", "at most 64 dimensions"),
]


@pytest.mark.parametrize(("old", "new", "words"), BOMBS, ids=[f"bomb{i}" for i in range(len(BOMBS))])
def test_size_expression_bombs_fail_fast(old: str, new: str, words: str, copy: Path) -> None:
    edit(copy, old, new)
    t0 = time.perf_counter()
    with pytest.raises(itc.ParseError, match=words) as err:
        itc.load(copy)
    assert time.perf_counter() - t0 < 2.0
    assert "\n" not in str(err.value) and err.value.line >= 2


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda t: t.replace("%x", "%lambda"), "not a valid value name"),
        (lambda t: t.replace("%x", "%1x"), "not a valid value name"),
        (lambda t: t.replace("%x", "%.."), "not a valid value name"),
        (lambda t: t.replace("%x", "%a.b"), "not a valid value name"),
        (lambda t: t.replace("output ", "output " + "[" * 10_000 + "1" + "]" * 10_000 + ", ", 1), "nested deeper"),
        (lambda t: t.replace("output ", "output " + "[" * 500 + "1" + "]" * 500 + ", ", 1), "nested deeper"),
        (lambda t: t.replace("output ", "output " + "9" * 100_000 + ", ", 1), "64 bits"),
        (lambda t: t + "%w = aten.relu.default(%x)" + " " * (1 << 23) + " : f32[2]\n", "longer than"),
        (lambda t: t.replace("signature in ", "signature in " + "[" * 100_000, 1), "nested deeper"),
        (lambda t: t.replace("symbol", "symbol", 1) + "symbol z in [5, 2]\n", "range"),
        (lambda t: "itir 1\nsymbol s in [2, 8]\nsymbol s in [2, 8]\n", "declared twice"),
        (lambda t: t.replace("itir 1\n", "itir 1\n\x00\n"), "control character"),
    ],
)
def test_hostile_text_is_one_parse_error(make, words: str, bundle: Path) -> None:
    text = make((bundle / "program.itir").read_text())
    t0 = time.perf_counter()
    with pytest.raises(itc.ItnetError, match=words) as err:
        itc.parse(text)
    assert time.perf_counter() - t0 < 2.0
    assert "\n" not in str(err.value)


def _transform_line(text: str) -> str:
    return next(ln for ln in text.splitlines() if "it.transform" in ln)


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        ('lowering="auto"', "lowering=0", "lowering .* must be a string"),
        ('family="stationary"', "family=[]", "unknown family"),
        ('support="grid"', "support=5", "support .* must be a string"),
        ("groups=1", 'groups="x"', "groups .* must be an integer"),
        ("groups=1", "groups=0", "groups .* must be an integer in \\[1"),
        ("rank=1", "rank=1e20", "rank .* must be an integer"),
        ("stride=[1]", "stride=[1e20]", "stride .* must be an integer"),
        ("transposed=false", "transposed=1", "true or false"),
        ('padding_mode="zeros"', 'padding_mode="evil"', "must be one of"),
        ("groups=1", "groups=%x", "groups .* must be an integer"),
        ("stride=[1]", "stride=[" + "[" * 500 + "1" + "]" * 500 + "]", "nested deeper"),
    ],
)
def test_transform_attributes_are_type_and_range_checked(old: str, new: str, words: str, bundle: Path) -> None:
    text = (bundle / "program.itir").read_text()
    line = _transform_line(text)
    assert old in line, line
    with pytest.raises(itc.ItnetError, match=words) as err:
        itc.parse(text.replace(line, line.replace(old, new)))
    assert "\n" not in str(err.value)


def test_gated_num_layers_cannot_allocate_without_bound() -> None:
    lstm = torch.nn.LSTM(4, 8)
    text = str(itc.convert(lstm, (torch.randn(5, 2, 4),)))
    line = _transform_line(text)
    for bad, words in (("num_layers=1e20", "must be an integer"), ("num_layers=1000000000", "weights must be a list")):
        t0 = time.perf_counter()
        with pytest.raises(itc.ItnetError, match=words):
            itc.parse(text.replace(line, line.replace("num_layers=1", bad)))
        assert time.perf_counter() - t0 < 2.0


# ---------------------------------------------------------------------------------------------- declared types


def test_declared_result_types_are_checked_at_build(copy: Path) -> None:
    text = (copy / "program.itir").read_text()
    line = next(ln for ln in text.splitlines() if "aten.relu.default" in ln)
    edit(copy, line, line.replace(": f32[2,8,16]", ": f32[7]"))
    prog = itc.load(copy)  # the text itself is well formed
    with pytest.raises(itc.ItnetError, match=r"produces f32\[2, 8, 16\] where f32\[7\] is declared") as err:
        itc.build(prog)
    assert "aten.relu.default" in str(err.value)


def test_wrong_result_count_and_dtype_are_caught(copy: Path) -> None:
    text = (copy / "program.itir").read_text()
    line = next(ln for ln in text.splitlines() if "aten.relu.default" in ln)
    edit(copy, line, line.replace(": f32[2,8,16]", ": i64[2,8,16]"))
    with pytest.raises(itc.ItnetError, match="where i64"):
        itc.build(itc.load(copy))


SPLIT = """itir 1
symbol s in [2, 64]
signature in {"children":[{"children":["*"],"context":null,"type":"builtins.tuple"},{"children":[],"context":[],"type":"builtins.dict"}],"context":null,"type":"builtins.tuple"}
input %x : f32[s,4]
%a, %b = aten.split.Tensor(%x, 8) : f32[floor(s/2),4], f32[s - floor(s/2),4] @"halves"
output %a, %b
"""


def test_types_right_only_at_some_sizes_are_caught_at_run_time_in_debug_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Declared as halves, computed as chunks of 8: true at s = 16 (the build check's size), wrong elsewhere."""
    mod = itc.build(itc.parse(SPLIT))
    a, b = mod(torch.randn(16, 4))
    assert a.shape == (8, 4) and b.shape == (8, 4)
    monkeypatch.setenv("ITNET_CHECK_TYPES", "1")
    with pytest.raises(itc.ItnetError, match=r"%a at run time: it produces f32\[8, 4\] where .* \(\[10, 4\]") as err:
        mod(torch.randn(20, 4))
    assert err.value.layer == "halves"


def test_a_failure_inside_the_generated_code_names_the_node() -> None:
    """Valid at the build check's size (s = 16: b is [8, 4]); at s = 10, b is [2, 4] and the view fails."""
    text = SPLIT.replace("output %a, %b", '%c = aten.view.default(%b, [8, 4]) : f32[8,4] @"reshape"\noutput %a, %c')
    mod = itc.build(itc.parse(text))
    assert mod(torch.randn(16, 4))[1].shape == (8, 4)
    with pytest.raises(itc.ItnetError, match=r"layer 'reshape': running %c = aten.view.default.*RuntimeError") as err:
        mod(torch.randn(10, 4))
    assert "\n" not in str(err.value)


def test_a_layer_name_with_a_newline_stays_one_line(copy: Path) -> None:
    text = (copy / "program.itir").read_text()
    line = next(ln for ln in text.splitlines() if "aten.relu.default" in ln)
    edit(copy, line, line.replace(": f32[2,8,16]", ': f32[7] @"evil\\nlayer"'))
    with pytest.raises(itc.ItnetError) as err:
        itc.build(itc.load(copy))
    assert "\n" not in str(err.value) and "layer 'evil\\nlayer'" in str(err.value)


# ---------------------------------------------------------------------------------------------- bundle files


def _garbage_weights(b: Path) -> None:
    (b / "weights.safetensors").write_bytes(b"\x00garbage" * 10)


def _truncated_weights(b: Path) -> None:
    data = (b / "weights.safetensors").read_bytes()
    (b / "weights.safetensors").write_bytes(data[: len(data) // 2])


def _meta(value: str):
    return lambda b: (b / "meta.json").write_text(value)


def _dir_for(name: str):
    def make(b: Path) -> None:
        (b / name).unlink()
        (b / name).mkdir()

    return make


def _symlink_dev_zero(b: Path) -> None:
    (b / "program.itir").unlink()
    (b / "program.itir").symlink_to("/dev/zero")


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_garbage_weights, "not a readable safetensors file"),
        (_truncated_weights, "not a readable safetensors file"),
        (_meta("[1, 2]"), "must hold a JSON object"),
        (_meta('"text"'), "must hold a JSON object"),
        (_meta("{" * 1_000_000), "nests deeper"),
        (_meta('{"format": 1,'), "not valid JSON"),
        (_meta('{"format": 1, "example": {"sizes": {"s": "x"}}}'), "'example' is malformed"),
        (_meta('{"format": 1, "source": {"spec": "m:make", "seed": "zero"}}'), None),
        (lambda b: (b / "program.itir").write_bytes(b"itir 1\n\xff\xfe\n"), "not UTF-8"),
        (_symlink_dev_zero, "not a regular file"),
        (_dir_for("weights.safetensors"), "is a directory"),
        (_dir_for("meta.json"), "is a directory"),
    ],
)
def test_broken_bundle_files_are_one_clean_error(damage, words: str | None, copy: Path, capsys) -> None:
    damage(copy)
    if words is None:  # loads fine; the bad source entry is refused where it is used
        code, _, err = cli(capsys, "run", copy, "--check", "--trust-source")
        assert code == 1 and "malformed 'source'" in one_line(err)
        return
    with pytest.raises(itc.ItnetError, match=words):
        itc.build(itc.load(copy))
    code, _, err = cli(capsys, "run", copy)
    assert code == 1, err  # a user error (1), not an internal error (3)
    assert words in one_line(err) or "cannot read" in err


def test_run_refuses_inputs_a_bundle_sizes_beyond_memory(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (copy / "program.itir").read_text().replace(",16]", ",99999999999]")
    (copy / "program.itir").write_text(text)
    code, _, err = cli(capsys, "run", copy)
    assert code == 1 and "give a smaller one" in one_line(err)


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        ('= "conv.weight"', '= "__annotations__"', "not a module path"),
        ('= "conv.weight"', '= "."', "not a module path"),
        ('= "conv.weight"', '= "\\u0000"', "not a module path"),
        ('= "conv.weight"', '= "conv.forward"', "not a module path"),
        (
            'signature out "*"',
            'signature out {"type":"builtins.tuple","context":null,"children":["*","*"]}',
            "2 leaves",
        ),
        (
            'signature out "*"',
            'signature out {"type":"collections.OrderedDict","context":null,"children":["*"]}',
            "key",
        ),
        ('signature out "*"', 'signature out {"type":"builtins.dict","context":["a","a"],"children":["*"]}', "key"),
    ],
)
def test_weight_keys_and_signatures_are_checked(old: str, new: str, words: str, copy: Path) -> None:
    edit(copy, old, new)
    with pytest.raises(itc.ItnetError, match=words):
        itc.build(itc.load(copy))


def test_meta_with_an_integer_past_the_digit_limit(copy: Path) -> None:
    (copy / "meta.json").write_text('{"format": 1, "seed": ' + "9" * 5000 + "}")
    with pytest.raises(itc.ItnetError, match="not valid JSON"):
        itc.load(copy)


@pytest.mark.parametrize("spec", ["library:=1", "library:x", "dense:samples=abc"])
def test_malformed_plan_specs_are_one_line(spec: str, bundle: Path) -> None:
    with pytest.raises(itc.ItnetError) as err:
        itc.build(itc.load(bundle), plan={"*": spec})
    assert "\n" not in str(err.value)
