"""IR unit tests: text round trips, parse errors with positions, the verifier, bundles, the graph view."""

from __future__ import annotations

import json

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import itnet_compiler as itc
from itnet_compiler.ir import graph, parse, print_program
from itnet_compiler.ir.types import make_symbol, parse_expr

PROGRAM = """itir 1
symbol seq in [2, 512]
input %x : f32[2,seq,64]
param %wq : f32[64,64] = "attn.q.weight"
param %wk : f32[64,64] = "attn.k.weight"
param %wv : f32[64,64] = "attn.v.weight"
%q0 = aten.linear.default(%x, %wq) : f32[2,seq,64] @"attn.q"
%k0 = aten.linear.default(%x, %wk) : f32[2,seq,64] @"attn.k"
%v0 = aten.linear.default(%x, %wv) : f32[2,seq,64] @"attn.v"
%n = aten.sym_size.int(%x, 1) : int(seq)
%q1 = aten.view.default(%q0, [2, %n, 4, 16]) : f32[2,seq,4,16] @"attn"
%k1 = aten.view.default(%k0, [2, %n, 4, 16]) : f32[2,seq,4,16] @"attn"
%v1 = aten.view.default(%v0, [2, %n, 4, 16]) : f32[2,seq,4,16] @"attn"
%q = aten.transpose.int(%q1, 1, 2) : f32[2,4,seq,16] @"attn"
%k = aten.transpose.int(%k1, 1, 2) : f32[2,4,seq,16] @"attn"
%v = aten.transpose.int(%v1, 1, 2) : f32[2,4,seq,16] @"attn"
%o = it.transform(q=%q, k=%k, v=%v) {family="dot_exp", heads=4, kv_heads=4, lowering="auto", mask="none", measure="uniform", normalize=true, return_weights=false, scale=0.25, support="causal"} : f32[2,4,seq,16] @"attn"
%z = aten.zeros.default([2, 3], dtype=dtype(f32), device=device("cpu"), layout=layout(strided), pin_memory=false) : f32[2,3]
%half = aten.div.Tensor(%z, 2.0) : f32[2,3]
%m = aten.clone.default(%half, memory_format=memory_format(contiguous_format)) : f32[2,3]
%s0, %s1 = aten.split.Tensor(%o, 8, 2) : f32[2,4,floor(seq/2),16], f32[2,4,seq - floor(seq/2),16]
output %s0, %m, none, 1e-12
"""


def test_print_parse_print_is_identity():
    prog = parse(PROGRAM)
    assert print_program(prog) == PROGRAM
    assert print_program(parse(print_program(prog))) == PROGRAM


def test_parsed_program_has_typed_transform():
    prog = itc.parse(PROGRAM)
    (t,) = prog.transforms
    assert t.family == "dot_exp" and t.attrs.heads == 4 and t.attrs.support == "causal"
    assert t.outputs[0].type.shape[2] == make_symbol("seq")
    assert prog.nodes[-1].outputs[1].type.shape[2] == make_symbol("seq") - sympy.floor(make_symbol("seq") / 2)


@pytest.mark.parametrize(
    "change, line, marker, words",
    [
        (("itir 1", "itir 2"), 1, "itir", "header"),
        (("default(%x, %wq)", "default(%xx, %wq)"), 7, "%xx", "before it is defined"),
        ((': f32[2,seq,64] @"attn.q"', ': f33[2,seq,64] @"attn.q"'), 7, "f33", "unknown dtype"),
        (('family="dot_exp"', 'family="nope"'), 17, "{", "unknown family"),
        (("heads=4, kv", "headz=4, kv"), 17, "{", "unknown attribute"),
        (("[2,seq,64]\nparam", "[2,seq+,64]\nparam"), 3, "seq+", "size expression"),
        (("%k0 = aten", "%q0 = aten"), 8, "%q0", "defined twice"),
        (("2.0) : f32[2,3]", "2.0 : f32[2,3]"), 19, ": f32", "expected ')'"),
    ],
)
def test_parse_errors_name_line_and_column(change, line, marker, words):
    text = PROGRAM.replace(*change, 1)
    with pytest.raises(itc.ParseError) as err:
        parse(text)
    assert err.value.line == line
    assert err.value.col == text.splitlines()[line - 1].index(marker) + 1
    assert words in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "change, words",
    [
        (("aten.linear.default(%x, %wq)", "aten.linearr.default(%x, %wq)"), "unknown op"),
        (("heads=4, kv_heads=4", "heads=3, kv_heads=3"), "do not match"),
        (('support="causal"', 'support="sideways"'), "support must be"),
        (('lowering="auto"', 'lowering="magic"'), "lowering 'magic'"),
        (("symbol seq in [2, 512]\n", ""), "undeclared size symbol"),
        (("it.transform(q=%q, k=%k, v=%v)", "it.transform(q=%q, k=%k)"), "missing input role 'v'"),
        (("aten.transpose.int(%v1, 1, 2)", "aten.transpose.int(%v1, 1, 2, 3, 4)"), "schema takes"),
    ],
)
def test_verifier_rejects_bad_programs(change, words):
    with pytest.raises(itc.ItnetError) as err:
        itc.parse(PROGRAM.replace(*change))
    assert words in str(err.value)
    assert "\n" not in str(err.value)


_sym = st.sampled_from([make_symbol("n"), make_symbol("seq"), make_symbol("b")])
_int = st.integers(min_value=1, max_value=9).map(sympy.Integer)
_atom = st.one_of(_sym, _int)
_expr = st.recursive(
    _atom,
    lambda sub: st.one_of(
        st.tuples(sub, sub).map(lambda t: t[0] + t[1]),
        st.tuples(sub, sub).map(lambda t: t[0] * t[1]),
        st.tuples(sub, sub).map(lambda t: t[0] - t[1]),
        st.tuples(sub, _int).map(lambda t: sympy.floor(t[0] / t[1])),
        st.tuples(sub, sub).map(lambda t: sympy.Max(t[0], t[1])),
        st.tuples(sub, _int).map(lambda t: sympy.Mod(t[0], t[1])),
    ),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None)
@given(_expr)
def test_size_expressions_round_trip(e):
    assert parse_expr(str(e)) == e


def test_bundle_round_trip_and_errors(tmp_path):
    prog = itc.parse(PROGRAM)
    prog.tensors = {k: torch.randn(64, 64) for k in ("attn.q.weight", "attn.k.weight", "attn.v.weight")}
    prog.meta = {"source": {"spec": "x.py:f"}}
    prog.save(tmp_path / "m.itir")
    back = itc.load(tmp_path / "m.itir")
    assert str(back) == PROGRAM
    assert back.meta["source"] == {"spec": "x.py:f"}
    assert torch.equal(back.tensors["attn.q.weight"], prog.tensors["attn.q.weight"])
    meta = json.loads((tmp_path / "m.itir" / "meta.json").read_text())
    assert meta["transforms"] == [{"layer": "attn", "family": "dot_exp", "lowering": "auto"}]
    with pytest.raises(itc.ItnetError, match="no IR bundle"):
        itc.load(tmp_path / "missing.itir")
    (tmp_path / "m.itir" / "weights.safetensors").unlink()
    with pytest.raises(itc.ItnetError, match="weights.safetensors"):
        itc.load(tmp_path / "m.itir")


def test_bundle_rejects_weight_of_wrong_shape(tmp_path):
    prog = itc.parse(PROGRAM)
    prog.tensors = {k: torch.randn(64, 64) for k in ("attn.q.weight", "attn.k.weight", "attn.v.weight")}
    prog.tensors["attn.v.weight"] = torch.randn(64, 32)
    prog.save(tmp_path / "m.itir")
    with pytest.raises(itc.ItnetError, match="attn.v.weight"):
        itc.load(tmp_path / "m.itir")


def test_networkx_view_answers_graph_queries():
    import networkx as nx

    g = graph.to_networkx(itc.parse(PROGRAM))
    assert nx.is_directed_acyclic_graph(g)
    assert g.nodes["o"]["family"] == "dot_exp"
    assert {"x", "wq", "wk", "wv"} <= nx.ancestors(g, "o")
    assert "z" not in nx.ancestors(g, "o")


def test_built_program_runs_the_parsed_attention():
    prog = itc.parse(PROGRAM)
    prog.tensors = {k: torch.randn(64, 64) * 0.1 for k in ("attn.q.weight", "attn.k.weight", "attn.v.weight")}
    x = torch.randn(2, 10, 64)
    out = itc.build(prog, plan={"attn": "dense"})(x)
    q, k, v = (torch.nn.functional.linear(x, prog.tensors[f"attn.{n}.weight"]) for n in "qkv")
    q, k, v = (t.view(2, 10, 4, 16).transpose(1, 2) for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out[0], ref[:, :, :8], rtol=1e-5, atol=1e-6)
    assert out[2] is None and out[3] == 1e-12
