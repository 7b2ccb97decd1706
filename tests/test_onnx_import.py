"""ONNX models as input: ONNX's own operator cases (shipped in the onnx wheel, with expected outputs computed by
onnx's reference) import and match on the torch backend, with every Conv / ConvTranspose / LSTM / RNN / Attention node
a transform; models exported by itnet round-trip (torch → ONNX → itnet → ONNX) with the same transforms and outputs;
bad files fail in one line."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.utils._pytree as pytree
from onnx import helper

import itnet_compiler as itc

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from onnx.backend.test.case.node import collect_testcases

    CASES = {t.name: t for t in collect_testcases(None)}

_FAMILY = {"Conv": "stationary", "ConvTranspose": "stationary", "LSTM": "gated", "GRU": "gated", "RNN": "gated"}
_FAMILY["Attention"] = "dot_exp"


def _ops(case) -> set[str]:
    return {n.op_type for n in case.model.graph.node}


def _names(op_types: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[str]:
    return sorted(
        n for n, c in CASES.items() if _ops(c) & set(op_types) and "bf16" not in n and not any(s in n for s in skip)
    )


CONV = _names(("Conv", "ConvTranspose"))
LSTM = _names(("LSTM",), skip=("peephole",))
RNN = _names(("RNN",))  # every case uses Tanh (ONNX's default): torch's rnn_tanh cell
# Attention with SDPA's semantics (no softcap, no QK output, no window / nonpad cache) is captured, as the
# Attention node and as its ``_expanded`` form (MatMul / Softmax written out, the scale split over q and k).
ATTENTION = [
    n for n in CASES if n.startswith("test_attention") and "bf16" not in n
    and not any(s in n for s in ("softcap", "qk_matmul", "window", "nonpad", "flexattention"))
]  # fmt: skip
# Every case of these op types (captured or not) must compute its expected outputs.
NUMERIC = _names(
    ("Conv", "ConvTranspose", "LSTM", "GRU", "RNN", "Attention"), skip=("flexattention", "window", "nonpad")
)


def _run(name: str):
    case = CASES[name]
    ins, outs = case.data_sets[0]
    args = tuple(torch.from_numpy(np.array(a)) for a in ins)
    prog = itc.convert(case.model, args)
    got = itc.build(prog)(*args)
    got = list(got) if isinstance(got, tuple) else [got]
    return case, prog, got, [np.asarray(e) for e in outs]


def _close(case, got, expected) -> None:
    assert len(got) >= len(expected)
    for g, e in zip(got, expected, strict=False):
        g = g.detach().numpy()
        assert g.shape == e.shape
        rtol = max(case.rtol, 1e-4) if e.dtype != np.float16 else 3e-3
        atol = max(case.atol, 1e-6) if e.dtype != np.float16 else 3e-3
        np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", NUMERIC)
def test_operator_cases_match_their_expected_outputs(name) -> None:
    case, _, got, expected = _run(name)
    _close(case, got, expected)


@pytest.mark.parametrize("name", CONV + LSTM + RNN + ATTENTION)
def test_operator_nodes_become_transforms(name) -> None:
    case, prog, _, _ = _run(name)
    want = sorted(_FAMILY[n.op_type] for n in case.model.graph.node if n.op_type in _FAMILY)
    if name.startswith("test_attention") and name.endswith("_expanded"):  # the Attention body inlined
        want = ["dot_exp"]
    assert sorted(n.family for n in prog.transforms) == want
    assert not [n.op for n in prog.generic_nodes() if "convolution" in n.op or "scaled_dot" in n.op or "lstm" in n.op]


def test_the_captured_sets_are_not_empty() -> None:
    assert len(CONV) >= 25 and len(LSTM) >= 5 and len(RNN) >= 6 and len(ATTENTION) >= 80
    assert sum(n.endswith("_expanded") for n in ATTENTION) >= 40


def _rnn_model(direction: str, activations: list[str]) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    d = 2 if direction == "bidirectional" else 1
    arrays = {"W": rng.standard_normal((d, 5, 3)), "R": 0.3 * rng.standard_normal((d, 5, 5))}
    arrays["B"] = rng.standard_normal((d, 10))
    inits = [onnx.numpy_helper.from_array(a.astype(np.float32), k) for k, a in arrays.items()]
    node = helper.make_node("RNN", ["X", "W", "R", "B"], ["Y", "Yh"], hidden_size=5, direction=direction,
                            activations=activations)  # fmt: skip
    x = helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [4, 2, 3])
    outs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("Y", "Yh")]
    graph = helper.make_graph([node], "g", [x], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


@pytest.mark.parametrize(
    ("direction", "activations", "cell"),
    [("forward", ["Relu"], "rnn_relu"), ("reverse", ["Tanh"], "rnn_tanh"),
     ("bidirectional", ["Relu", "Relu"], "rnn_relu"), ("bidirectional", ["Relu", "Tanh"], None),
     ("forward", ["Sigmoid"], None)],
)  # fmt: skip
def test_onnx_rnn_imports_as_a_gated_rnn_where_torch_computes_it(direction, activations, cell) -> None:
    """One activation for every direction, Tanh or Relu, is torch's cell (onnxruntime the reference); mixed or other
    activations run unrolled. Batch-first layout is ONNX's own case test_simple_rnn_batchwise (onnxruntime has no
    layout=1 RNN)."""
    import onnxruntime as ort

    model = _rnn_model(direction, activations)
    x = np.random.default_rng(1).standard_normal((4, 2, 3)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})
    prog = itc.convert(model, (torch.from_numpy(x),))
    assert [n.attrs.cell for n in prog.transforms] == ([cell] if cell else [])
    got = itc.build(prog)(torch.from_numpy(x))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.detach().numpy(), w, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ round trip
ROUND_TRIP = [(n, o) for n in ("cnn", "encoder-causal", "gpt2-sdpa-dyn", "bert-sdpa") for o in (18, 23)]


@pytest.mark.parametrize(("case", "opset"), ROUND_TRIP, indirect=["case"])
def test_torch_onnx_itnet_onnx_round_trip(case, prog, opset, tmp_path) -> None:
    """At opset 23 attention travels as Attention nodes, at 18 as the MatMul / Softmax form itnet writes."""
    first = tmp_path / "first.onnx"
    itc.export_onnx(prog, first, opset=opset)
    again = itc.convert(str(first))
    assert sorted(n.family for n in again.transforms) == sorted(n.family for n in prog.transforms)
    assert set(again.symbols) == set(prog.symbols)
    flat = [x for x in pytree.tree_flatten((case.args, case.kwargs))[0]]
    ref = [x for x in pytree.tree_flatten(itc.build(prog)(*case.args, **case.kwargs))[0]]
    got = itc.build(again)(*flat)
    got = list(got) if isinstance(got, tuple) else [got]
    for g, r in zip(got, ref, strict=True):
        assert (g - r).abs().max() <= 1e-5 * r.abs().max()
    second = itc.export_onnx(again, tmp_path / "second.onnx", opset=opset)
    onnx.checker.check_model(second, full_check=True)
    if case.inputs_at is not None:
        args, kwargs = case.inputs_at(13)
        flat = pytree.tree_flatten((args, kwargs))[0]
        want = pytree.tree_flatten(itc.build(prog)(*args, **kwargs))[0][0]
        assert (itc.build(again)(*flat) - want).abs().max() <= 1e-5 * want.abs().max()


def test_cli_converts_an_onnx_file(tmp_path, capsys) -> None:
    from itnet_compiler.cli import main

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3, 16, 16])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 11)])
    path = tmp_path / "conv.onnx"
    onnx.save(model, str(path))
    assert main(["convert", str(path), "-o", str(tmp_path / "m.itir")]) == 0
    out = capsys.readouterr().out
    assert "transforms: 1 (1 stationary)" in out and "batch" in out
    prog = itc.load(tmp_path / "m.itir")
    x = torch.randn(3, 3, 16, 16)
    want = torch.relu(torch.nn.functional.conv2d(x, torch.from_numpy(onnx.numpy_helper.to_array(w)), padding=1))
    assert torch.allclose(itc.build(prog)(x), want, atol=1e-5)


def test_bad_onnx_input_fails_in_one_line(tmp_path) -> None:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    odd = helper.make_model(helper.make_graph([helper.make_node("Hardmax", ["x"], ["y"], name="hm")], "g", [x], [y]))
    with pytest.raises(itc.ItnetError, match="node 'hm' has op type Hardmax") as err:
        itc.convert(odd)
    assert "\n" not in str(err.value)
    custom = helper.make_model(helper.make_graph([helper.make_node("Foo", ["x"], ["y"], domain="acme")], "g", [x], [y]))
    with pytest.raises(itc.ItnetError, match="acme.Foo"):
        itc.convert(custom)
    with pytest.raises(itc.ItnetError, match="no such ONNX file"):
        itc.convert(str(tmp_path / "missing.onnx"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(itc.ItnetError, match="not a readable ONNX model"):
        itc.convert(str(junk))


def test_scan_imports_as_a_loop_at_a_static_length(tmp_path) -> None:
    """A Mamba model exported by itnet holds its ssm as an ONNX Scan; imported back at a fixed length it computes
    the same outputs (the Scan runs as a loop of generic ops: no ssm transform)."""
    from test_recurrent import CASES as RECURRENT

    case = RECURRENT["mamba"]()
    args = case.inputs(11)
    prog = itc.convert(case.model, args, dynamic_shapes=case.dynamic)
    itc.export_onnx(prog, tmp_path / "m.onnx")
    assert any(n.op_type == "Scan" for n in onnx.load(str(tmp_path / "m.onnx")).graph.node)
    again = itc.convert(str(tmp_path / "m.onnx"), args, dynamic_shapes={})
    got, want = itc.build(again)(*args), pytree.tree_flatten(itc.build(prog)(*args))[0][0]
    got = got[0] if isinstance(got, tuple) else got
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
