"""ONNX export: every model of the core and recurrence sets exports, passes onnx.checker (full_check) and runs in
onnxruntime within 1e-4 of the torch backend — at two lengths where the model has a dynamic one — as standard ops
and with each transform kept as an ``itnet``-domain function; plans with FAVOR+ low rank and seeded Monte Carlo
attention export too. onnxruntime is the independent runtime; the torch backend (fp32) is the reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.utils._pytree as pytree
from models import DYNAMIC, FACTORIES
from test_recurrent import CASES as RECURRENT
from test_recurrent import captured_as

import itnet_compiler as itc

TOL = 1e-4
CORE = list(FACTORIES)
DYN = list(DYNAMIC)
# S4D builds its kernel (or holds its state) in complex arithmetic, which ONNX has none of: a clear refusal, below.
COMPLEX = ("s4d", "s4d-as-ssm")
REC = [n for n in RECURRENT if n not in COMPLEX]


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_onnx(model: onnx.ModelProto, args: tuple, kwargs: dict, prog: itc.Program) -> list[np.ndarray]:
    """Feed the call's tensors by the program's input names (the exported graph's inputs)."""
    s = session(model)
    flat = [x for x in pytree.tree_flatten((tuple(args), kwargs))[0]]
    by_name = {v.name: x for v, x in zip(prog.inputs, flat, strict=True)}
    return s.run(None, {i.name: by_name[i.name].numpy() for i in s.get_inputs()})


def assert_matches(outs: list[np.ndarray], ref: object, tol: float = TOL) -> None:
    leaves = [x for x in pytree.tree_flatten(ref)[0] if isinstance(x, torch.Tensor)]
    assert len(outs) == len(leaves), f"{len(outs)} ONNX outputs, the torch backend gives {len(leaves)}"
    for i, (o, r) in enumerate(zip(outs, leaves, strict=True)):
        r = r.detach().numpy()
        assert o.shape == r.shape, f"output {i}: {o.shape} vs {r.shape}"
        if not r.size:
            continue
        if not np.issubdtype(r.dtype, np.floating):
            assert np.array_equal(o, r), f"output {i} differs"
            continue
        err = float(np.abs(o.astype(np.float64) - r).max() / max(np.abs(r).max(), 1e-30))
        assert err <= tol, f"output {i}: relative error {err:.3g} > {tol}"


def _recurrent(name: str, zoo):
    def make():
        case = RECURRENT[name]()
        args = case.inputs(11)
        if case.capture is None:
            return case, itc.convert(case.model, args, dynamic_shapes=case.dynamic)
        with captured_as(case.capture):  # S4D: the test's module converter, in the form the case names
            return case, itc.convert(case.model, args, dynamic_shapes=case.dynamic)

    return zoo.memo(("rec", name), make)


def _calls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == "itnet"]


# ------------------------------------------------------------------------------------------------ core models
@pytest.mark.parametrize("case", CORE + DYN, indirect=True)
def test_core_models_export_as_standard_ops(case, prog, zoo, tmp_path) -> None:
    path = tmp_path / "m.onnx"
    model = itc.export_onnx(prog, path)
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded, full_check=True)
    assert not _calls(loaded) and {o.domain for o in loaded.opset_import} <= {"", "ai.onnx"}
    ref = zoo.memo(("torch-build", case.name), lambda: itc.build(prog))
    assert_matches(run_onnx(model, case.args, case.kwargs, prog), ref(*case.args, **case.kwargs))
    if case.inputs_at is not None:  # a dynamic length: the same model at another one
        args, kwargs = case.inputs_at(13)
        assert_matches(run_onnx(model, args, kwargs, prog), ref(*args, **kwargs))
        dims = {d.dim_param for i in loaded.graph.input for d in i.type.tensor_type.shape.dim}
        assert set(prog.symbols) <= dims, f"dynamic dims {dims} do not keep the IR symbols {set(prog.symbols)}"


@pytest.mark.parametrize("case", CORE + DYN, indirect=True)
def test_core_models_keep_transforms_as_itnet_functions(case, prog, zoo) -> None:
    model = itc.export_onnx(prog, opset=23, keep_transforms=True)
    calls = _calls(model)
    assert len(calls) == len(prog.transforms)
    assert sorted(n.name.split("#")[0] for n in calls) == sorted(n.name for n in prog.transforms)
    defined = {(f.domain, f.name) for f in model.functions}
    assert all(("itnet", n.op_type) in defined for n in calls)
    fams = {next(p.value for p in n.metadata_props if p.key == "itnet.family") for n in calls}
    assert fams == {n.family for n in prog.transforms}
    ref = zoo.memo(("torch-build", case.name), lambda: itc.build(prog))
    assert_matches(run_onnx(model, case.args, case.kwargs, prog), ref(*case.args, **case.kwargs))


@pytest.mark.parametrize("case", ["bert-sdpa", "llama-sdpa", "encoder-causal"], indirect=True)
def test_opset_23_uses_the_attention_op(case, prog) -> None:
    inlined = itc.export_onnx(prog, opset=23)
    below = itc.export_onnx(prog, opset=18)
    attn = sum(n.op_type == "Attention" for n in inlined.graph.node)
    assert attn == len([n for n in prog.transforms if n.family == "dot_exp"])
    assert not any(n.op_type == "Attention" for n in below.graph.node)
    assert any(n.op_type == "Softmax" for n in below.graph.node)
    assert_matches(run_onnx(inlined, case.args, case.kwargs, prog), itc.build(prog)(*case.args, **case.kwargs))


@pytest.mark.parametrize("case", ["cnn", "resnet", "conv-ops"], indirect=True)
def test_convolutions_become_conv_ops(case, prog) -> None:
    model = itc.export_onnx(prog)
    convs = sum(n.op_type in ("Conv", "ConvTranspose") for n in model.graph.node)
    assert convs == len([n for n in prog.transforms if n.family == "stationary"])


# ------------------------------------------------------------------------------------------------ recurrence
@pytest.mark.parametrize("name", REC)
@pytest.mark.parametrize("keep", [False, True])
def test_recurrent_models_export_at_two_lengths(name, keep, zoo) -> None:
    case, prog = _recurrent(name, zoo)
    model = itc.export_onnx(prog, opset=18, keep_transforms=keep)
    ops = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
    families = {n.family for n in prog.transforms}
    if "gated" in families:
        cells = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}
        cell = cells[next(n.attrs.cell for n in prog.transforms if n.family == "gated")]
        assert cell in ops or "Scan" in ops  # a projected LSTM is a Scan (ONNX's LSTM has no projection)
    if "ssm" in families:
        assert "Scan" in ops
    built = itc.build(prog)
    for n in (11, 23):
        args = case.inputs(n)
        assert_matches(run_onnx(model, args, {}, prog), built(*args))


@pytest.mark.parametrize("name", COMPLEX)
def test_complex_arithmetic_is_refused_in_one_line(name, zoo) -> None:
    _, prog = _recurrent(name, zoo)
    with pytest.raises(itc.ItnetError, match=r"layer 'blocks\.0\.s4d'.*complex") as err:
        itc.export_onnx(prog)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ approximations
APPROX = [
    (name, spec)
    for spec in (
        "lowrank:rank=16,seed=1",
        "montecarlo:samples=16,seed=3",
        "montecarlo:samples=8,seed=0,proposal=uniform",
    )
    # BERT's padding mask varies across rows only in shape, not value: low rank refuses it, sampling takes it
    for name in ("encoder-plain", "vit-sdpa", *(("bert-sdpa",) if spec.startswith("montecarlo") else ()))
]


@pytest.mark.parametrize(("case", "spec"), APPROX, indirect=["case"])
@pytest.mark.parametrize("keep", [False, True])
def test_seeded_approximations_match_the_torch_backend(case, prog, spec, keep) -> None:
    plan = {n.layer: spec for n in prog.transforms if n.family == "dot_exp"}
    model = itc.export_onnx(prog, plan=plan, keep_transforms=keep)
    approx = itc.build(prog, plan=plan)(*case.args, **case.kwargs)
    exact = itc.build(prog)(*case.args, **case.kwargs)
    outs = run_onnx(model, case.args, case.kwargs, prog)
    assert_matches(outs, approx)
    a, e = (pytree.tree_flatten(x)[0][0] for x in (approx, exact))
    assert (a - e).abs().max() > 1e-3, "the plan's lowering is not approximate: the test would prove nothing"


@pytest.mark.parametrize("case", ["encoder-plain"], indirect=True)
def test_lowerings_without_onnx_form_fail_in_one_line(case, prog) -> None:
    layer = prog.transforms[0].layer
    for spec, why in (("lowrank:method=nystrom", "does not export"), ("montecarlo:mode=shared", "data-dependent")):
        with pytest.raises(itc.ItnetError, match=why) as err:
            itc.export_onnx(prog, plan={layer: spec})
        assert f"layer '{layer}'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(itc.ItnetError, match="no ONNX mapping.*--fallback trace"):
        itc.export_onnx(prog, plan={layer: "hybrid"})
    with pytest.raises(itc.ItnetError, match="opset 12"):
        itc.export_onnx(prog, opset=12)
