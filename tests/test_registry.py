"""The lowering registry and the targets (ir/lowering.py, ir/target.py): a lowering registered from outside the
package runs through a plan, the cost model, build, ``itnet inspect`` and ``itnet lowerings``; bad specs are one line
naming the layer and the valid choices; the records and the backends agree."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import sympy
import torch
import torch.nn.functional as F

import itnet_compiler as itc
from itnet_compiler import cli
from itnet_compiler.backends.torch.registry import LOWERINGS as TORCH_IMPLS
from itnet_compiler.backends.torch.registry import register as register_torch
from itnet_compiler.ir.cost import Cost, cost_of
from itnet_compiler.ir.lowering import REGISTRY, LoweringSpec
from itnet_compiler.ir.target import TARGETS
from itnet_compiler.passes.choose_lowering import ChooseOptions, choose_lowering


class SelfAttention(torch.nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)
        self.causal = causal

    def forward(self, x):
        q, k, v = self.proj(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


@dataclass(frozen=True)
class SplitOptions(itc.Options):
    lowering = "split_keys"
    parts: int = itc.option(2, "key blocks merged by log-sum-exp", lo=1, hi=64, tune=(1, 8))


def split_keys_attention(q, k, v, mask=None, *, scale, causal, parts):
    """Exact softmax attention over ``parts`` key blocks, merged by their log-sum-exp (written here, independent
    of the package's lowerings)."""
    logits = (q @ k.transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    outs, lses = [], []
    for idx in torch.arange(k.shape[-2]).chunk(parts):
        block = logits[..., idx]
        lse = torch.logsumexp(block, dim=-1, keepdim=True)
        p = torch.exp(block - lse).nan_to_num(0.0)
        outs.append(p @ v[..., idx, :])
        lses.append(lse)
    total = torch.logsumexp(torch.stack(lses), dim=0)
    return sum(o * torch.exp(lse - total).nan_to_num(0.0) for o, lse in zip(outs, lses, strict=True))


@pytest.fixture
def split_keys():
    """``dot_exp`` lowering ``split_keys`` registered from this file alone: record, cost rule, torch implementation."""

    def admits(attrs, opts):
        return "it has no mask input" if attrs.mask != "none" else None

    @itc.register_lowering("dot_exp", "split_keys", exact=True, options=SplitOptions, admits=admits,
                           doc="exact attention over key blocks")  # fmt: skip
    def cost(node, opts, tensors):
        # Deliberately cheap, so that the cost model prefers it: the test checks that the rule is what ranks.
        return Cost(sympy.Integer(opts.parts), sympy.Integer(1), sympy.Integer(0))

    @register_torch("dot_exp", "split_keys")
    def impl(node, opts):
        return split_keys_attention, {"scale": node.attrs.scale, "causal": node.attrs.causal, "parts": opts.parts}

    yield
    itc.unregister_lowering("dot_exp", "split_keys")
    TORCH_IMPLS.pop(("dot_exp", "split_keys"), None)


def _program(causal: bool = True):
    torch.manual_seed(0)
    model = SelfAttention(causal).eval()
    x = torch.randn(2, 12, 16)
    return itc.convert(model, (x,)), model, x


def test_a_lowering_registered_outside_the_package_runs_through_plan_cost_and_build(split_keys):
    prog, model, x = _program()
    mod = itc.build(prog, plan={"*": "split_keys:parts=3"})
    (node,) = mod.program.transforms
    assert node.lowering == "split_keys:parts=3"
    assert isinstance(node.attrs.lowering, LoweringSpec) and node.attrs.lowering.opts == {"parts": 3}
    torch.testing.assert_close(mod(x), model(x), rtol=1e-5, atol=1e-6)
    assert "split_keys:parts=3" in str(mod.program)
    assert itc.parse(str(mod.program)).transforms[0].lowering == "split_keys:parts=3"

    # The cost model reads the record's rule, with typed options.
    assert cost_of(node, "split_keys:parts=5").flops == 5
    chosen = choose_lowering(prog.clone(), ChooseOptions())
    assert chosen.transforms[0].lowering == "split_keys"  # the cheapest exact candidate of the torch target
    # ... but not on a target that does not run it.
    on_triton = choose_lowering(prog.clone(), ChooseOptions(), TARGETS["triton"])
    assert on_triton.transforms[0].lowering == "fused"
    auto = itc.build(prog, error_budget=0)
    assert auto.program.transforms[0].lowering == "split_keys"
    torch.testing.assert_close(auto(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_registered_lowering_is_shown_by_inspect_and_lowerings(split_keys, tmp_path, capsys):
    prog, _, _ = _program()
    planned = itc.plan_program(prog, {"*": "split_keys:parts=4"})
    planned.save(tmp_path / "m.itir")
    assert cli.main(["inspect", str(tmp_path / "m.itir"), "--cost"]) == 0
    out = capsys.readouterr().out
    assert "split_keys:parts=4" in out
    assert cli.main(["lowerings", "dot_exp"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "split_keys" in x and "exact attention" in x)
    assert "torch-cpu" in line and "torch-cuda" in line and "triton" not in line
    assert "parts" in out and "key blocks merged" in out and "[1, 64]" in out
    assert cli.main(["lowerings", "dot_exp", "--json"]) == 0
    records = {r["lowering"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["split_keys"]["options"][0]["name"] == "parts"
    assert records["split_keys"]["options"][0]["tune"] == [1, 8]
    assert records["split_keys"]["targets"] == ["torch-cpu", "torch-cuda"]
    assert {r.name for r in itc.lowerings("dot_exp")} >= {"split_keys", "fused", "library"}


def test_bad_specs_of_a_registered_lowering_name_the_layer_and_the_choices(split_keys):
    prog, _, _ = _program()
    with pytest.raises(itc.ItnetError, match=r"parts must be an integer in \[1, 64\], not 0"):
        itc.build(prog, plan={"*": "split_keys:parts=0"})
    with pytest.raises(itc.ItnetError, match=r"unknown option\(s\) \['bogus'\].*known: parts"):
        itc.build(prog, plan={"*": "split_keys:bogus=1"})
    with pytest.raises(itc.ItnetError, match=r"'split_keys' of family dot_exp does not run on target triton; "
                                             r"choose one of dense, library, fused, montecarlo, lowrank"):  # fmt: skip
        itc.plan_program(prog, {"*": "split_keys"}, backend="triton")


def test_unknown_lowerings_and_options_are_one_line_with_the_valid_choices(tmp_path, capsys):
    prog, _, _ = _program()
    with pytest.raises(itc.ItnetError, match=r"unknown lowering 'nonsense'; lowerings are: auto, .*fused.*montecarlo"):
        itc.build(prog, plan={"*": "nonsense"})
    with pytest.raises(itc.ItnetError, match=r"unknown option\(s\) \['sample'\].*known: .*samples"):
        itc.build(prog, plan={"*": "montecarlo:sample=3"})
    with pytest.raises(itc.ItnetError, match=r"samples must be an integer in \[2, "):
        itc.build(prog, plan={"*": "montecarlo:samples=1"})
    with pytest.raises(itc.ItnetError, match=r"proposal must be one of norm, uniform, lowrank, probe, not 'best'"):
        itc.build(prog, plan={"*": "montecarlo:proposal=best"})
    with pytest.raises(itc.ItnetError, match=r"tile option block_m .* integer"):
        itc.build(prog, backend="triton", plan={"*": "fused:block_m=x"})
    with pytest.raises(itc.ItnetError, match="unknown family 'conv'; families are: stationary, dot_exp"):
        itc.lowerings("conv")
    prog.save(tmp_path / "m.itir")
    assert cli.main(["run", str(tmp_path / "m.itir"), "--lowering", "*=nonsense"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("itnet: error: plan entry '*': unknown lowering 'nonsense'; lowerings are: auto, ")
    assert len(err.splitlines()) == 1
    assert cli.main(["lowerings", "conv"]) == 1


def test_the_spec_prints_as_text_and_parses_back():
    for text in ("fused", "montecarlo:samples=128,proposal=norm,seed=0", "lowrank:rank=64,method=nystrom",
                 "montecarlo:defensive=0.25"):  # fmt: skip
        spec = LoweringSpec.parse(text)
        assert str(spec) == text and LoweringSpec.parse(str(spec)) == spec and spec == text
    assert LoweringSpec.parse(" chunked : chunk=32 ").opts == {"chunk": 32}
    for bad in ("Fused", "fused:samples", "fused:a=1,a=2", "", "x" * 300, "montecarlo:=3"):
        with pytest.raises(ValueError):
            LoweringSpec.parse(bad)


def test_every_target_runs_only_registered_lowerings_and_each_record_runs_somewhere():
    itc.targets()
    for t in TARGETS.values():
        assert all(key in REGISTRY for key in t.runs), t.name
    for key, rec in REGISTRY.items():
        assert any(t.can_run(*key) for t in TARGETS.values()), key
        assert dataclasses.is_dataclass(rec.options)
        assert rec.exact or rec.error_model, f"{key}: an approximation needs an error model"
    assert set(TARGETS["torch-cpu"].runs) == set(TORCH_IMPLS)


def test_triton_tile_names_are_the_fields_the_kernels_read():
    import os
    import subprocess
    import sys

    code = (
        "from dataclasses import fields\n"
        "from itnet_compiler.backends.triton import codegen, montecarlo, lowrank, conv_approx\n"
        "assert set(codegen.MC_ATTENTION_TILES) == {f.name for f in fields(montecarlo.MonteCarloTiles)}\n"
        "assert set(codegen.LOWRANK_TILES) == set(lowrank.TUNING)\n"
        "assert set(codegen.CONV_TILES) == conv_approx.CONV_TILES\n"
        "assert set(codegen.MC_CONV_TILES) == conv_approx.MC_TILES\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_exact_defaults_follow_the_target():
    prog, _, _ = _program()
    assert itc.plan_program(prog).transforms[0].lowering == "library"
    assert itc.plan_program(prog, backend="triton").transforms[0].lowering == "fused"
    assert itc.plan_program(prog, backend="torch-cuda").transforms[0].lowering == "library"
    with pytest.raises(itc.ItnetError, match="unknown backend or target 'tpu'; available: torch, triton"):
        itc.build(prog, backend="tpu")
