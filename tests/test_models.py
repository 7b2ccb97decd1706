"""Real-model acceptance tests: every convolution and attention layer of a real model becomes an ``it.transform``,
and the built module computes what the model computes.

Expected layer counts come from the models themselves (their conv modules, their attention classes, their configs),
never from itnet. Outputs are compared leaf by leaf against eager PyTorch in fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from models import ATTENTION_FREE, DYNAMIC, FACTORIES, FLAT_HEADS, Case

import itnet_compiler as itc

NAMES = list(FACTORIES)
DYN_NAMES = list(DYNAMIC)
REL_TOL = 1e-5

# Ops that are convolutions or attention: none may be left generic in these models.
ABSORBED = (
    "aten.conv",
    "aten.convolution",
    "aten._convolution",
    "aten.scaled_dot_product_attention",
    "aten.softmax",
    "aten._softmax",
    "aten._safe_softmax",
)


def plan_for(case: Case, kind: str) -> dict[str, str] | None:
    """``fused`` exists for attention only in the torch backend, so in a model that also has convolutions the fused
    plan names the attention layers."""
    if kind == "default":
        return None
    if kind == "fused" and case.conv_layers:
        return {path: "fused" for path in case.attention_layers}
    return {"*": kind}


PLANS = [(n, k) for n in NAMES for k in ("default", "dense", "fused") if k != "fused" or n not in ATTENTION_FREE]


@pytest.fixture
def builder(prog: itc.Program, zoo):
    """Build ``prog`` once per plan kind."""

    def get(case: Case, kind: str) -> torch.nn.Module:
        return zoo.memo(("build", case.name, kind), lambda: itc.build(prog, backend="torch", plan=plan_for(case, kind)))

    return get


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (out - ref).abs().max().item() if ref.numel() else 0.0
    return diff / max(scale, 1e-30)


def assert_same_outputs(out: object, ref: object, tol: float = REL_TOL) -> None:
    assert type(out) is type(ref), f"output type {type(out).__name__}, eager gives {type(ref).__name__}"
    leaves, spec = pytree.tree_flatten(out)
    ref_leaves, ref_spec = pytree.tree_flatten(ref)
    assert spec == ref_spec, f"output structure {spec} differs from eager {ref_spec}"
    for i, (a, b) in enumerate(zip(leaves, ref_leaves, strict=True)):
        if not isinstance(b, torch.Tensor):
            assert a == b, f"leaf {i}: {a!r} != {b!r}"
            continue
        assert isinstance(a, torch.Tensor), f"leaf {i} is {type(a).__name__}, eager gives a tensor"
        a, b = a.detach(), b.detach()
        assert a.shape == b.shape and a.dtype == b.dtype, (
            f"leaf {i}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        )
        if not b.is_floating_point():
            assert torch.equal(a, b), f"leaf {i} differs"
            continue
        assert not b.isnan().any(), f"leaf {i}: eager output has NaN; the test inputs are wrong"
        err = rel_err(a, b)
        assert err <= tol, f"leaf {i}: relative error {err:.3g} > {tol}"


def first_tensor(case: Case) -> tuple[int, torch.Tensor]:
    leaves, _ = pytree.tree_flatten((case.args, case.kwargs))
    return next((i, x) for i, x in enumerate(leaves) if isinstance(x, torch.Tensor))


def with_leaf(case: Case, index: int, value: torch.Tensor) -> tuple[tuple, dict]:
    leaves, spec = pytree.tree_flatten((case.args, case.kwargs))
    leaves[index] = value
    return pytree.tree_unflatten(leaves, spec)


# ------------------------------------------------------------------------------------------------ recognition
@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_every_layer_becomes_a_transform(case: Case, prog: itc.Program) -> None:
    by_family: dict[str, list[str]] = {}
    for node in prog.transforms:
        by_family.setdefault(node.family, []).append(node.layer)
    assert case.conv_layers or case.attention_layers, "the case has no layer to recognise"
    assert (case.name in ATTENTION_FREE) == (not case.attention_layers)
    if case.config_layers is not None:
        assert len(case.attention_layers) == case.config_layers
    assert sorted(by_family.get("stationary", [])) == sorted(case.conv_layers)
    assert sorted(by_family.get("dot_exp", [])) == sorted(case.attention_layers)
    assert set(by_family) <= {"stationary", "dot_exp"}
    left = [n.op for n in prog.generic_nodes() if n.op.startswith(ABSORBED)]
    assert not left, f"convolution/attention ops left generic: {left}"


@pytest.mark.parametrize("case", [n for n in NAMES if n not in ATTENTION_FREE | FLAT_HEADS], indirect=True)
def test_attention_attributes(case: Case, prog: itc.Program) -> None:
    """Heads, GQA key/value heads and the softmax scale as the model's config states them."""
    assert case.heads is not None
    heads, kv_heads, scale = case.heads
    for node in prog.transforms:
        if node.family != "dot_exp":
            continue
        assert (node.attrs.heads, node.attrs.kv_heads) == (heads, kv_heads), node.layer
        assert node.attrs.scale == pytest.approx(scale, rel=1e-12), node.layer


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_unknown_ops_stay_generic(case: Case, prog: itc.Program) -> None:
    assert case.generic_ops, "the case names no generic op to look for"
    for op, expected in case.generic_ops.items():
        found = sum(1 for n in prog.generic_nodes() if n.op == op)
        assert found == expected, f"{op}: {found} generic nodes, the model has {expected}"
        assert f"= {op}(" in str(prog)


# ------------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize(("case", "kind"), PLANS, indirect=["case"])
def test_matches_eager(case: Case, builder, eager_out: object, kind: str) -> None:
    mod = builder(case, kind)
    out = mod(*case.args, **case.kwargs)
    assert_same_outputs(out, eager_out)
    if kind == "default":
        return
    default = {n.layer: n.lowering for n in builder(case, "default").program.transforms}
    for node in mod.program.transforms:
        # A glob skips layers that cannot take the lowering: fused never materialises the weights a layer returns.
        skipped = kind == "fused" and (node.family != "dot_exp" or node.attrs.return_weights)
        assert node.lowering == (default[node.layer] if skipped else kind), node.layer


# ---------------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_print_parse_print(case: Case, prog: itc.Program) -> None:
    text = str(prog)
    assert str(itc.parse(text)) == text
    planned = str(itc.plan_program(prog, plan_for(case, "dense")))
    assert str(itc.parse(planned)) == planned


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_save_load_build(case: Case, prog: itc.Program, builder, eager_out: object, tmp_path) -> None:
    path = tmp_path / "model.itir"
    prog.save(str(path))
    loaded = itc.load(path)
    assert str(loaded) == str(prog)
    out = itc.build(loaded)(*case.args, **case.kwargs)
    original = builder(case, "default")(*case.args, **case.kwargs)
    for a, b in zip(pytree.tree_leaves(out), pytree.tree_leaves(original), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert_same_outputs(out, eager_out)


# --------------------------------------------------------------------------------------------------- dynamic
@pytest.mark.parametrize("case", DYN_NAMES, indirect=True)
def test_dynamic_sequence_symbol(case: Case, prog: itc.Program) -> None:
    assert prog.symbols.get("seq") == [2, 32]
    text = str(prog)
    assert "symbol seq in [2, 32]" in text
    for v in prog.inputs:
        assert str(v.type) == "i64[2,seq]", v
    assert sorted(n.layer for n in prog.transforms if n.family == "dot_exp") == sorted(case.attention_layers)
    for node in prog.transforms:
        assert [str(d) for d in node.kwargs["q"].type.shape[2:3]] == ["seq"], node.layer  # [B, H, L, D]


@pytest.mark.parametrize(
    ("case", "kind"), [(n, k) for n in DYN_NAMES for k in ("default", "dense", "fused")], indirect=["case"]
)
def test_dynamic_sequence_runs(case: Case, builder, zoo, kind: str) -> None:
    mod = builder(case, kind)
    for length in (5, 13):
        args, kwargs = case.inputs_at(length)
        ref = zoo.memo(("eager", case.name, str(length)), lambda a=args, k=kwargs: case.model(*a, **k))
        assert_same_outputs(mod(*args, **kwargs), ref)


@pytest.mark.parametrize("case", DYN_NAMES, indirect=True)
def test_dynamic_length_out_of_range(case: Case, builder) -> None:
    args, kwargs = case.inputs_at(40)
    with pytest.raises(itc.ItnetError) as err:
        builder(case, "default")(*args, **kwargs)
    assert len(str(err.value).splitlines()) == 1


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("change", ["batch", "rank"])
@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_wrong_input_shape(case: Case, builder, change: str) -> None:
    index, x = first_tensor(case)
    if change == "batch":
        bad = torch.zeros((x.shape[0] + 1, *x.shape[1:]), dtype=x.dtype)
    else:
        bad = x.unsqueeze(0)
    args, kwargs = with_leaf(case, index, bad)
    with pytest.raises(itc.ItnetError) as err:
        builder(case, "default")(*args, **kwargs)
    message = str(err.value)
    assert message and len(message.splitlines()) == 1
