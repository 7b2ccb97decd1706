"""The cost model (ir/cost.py) and the choose-lowering pass: symbolic costs, exact-by-default choices, and a-priori
error models that the measured error of the chosen lowering honours."""

from __future__ import annotations

import math

import pytest
import sympy
import torch
import torch.nn.functional as F

import itnet_compiler as itc
from itnet_compiler.backends.torch import lowerings as L
from itnet_compiler.ir.cost import Ceilings, Cost, cost_of, evaluate
from itnet_compiler.ir.lowering import REGISTRY, lowerings
from itnet_compiler.ir.lowerings.stationary import svd_error
from itnet_compiler.passes.choose_lowering import ChooseOptions, choose_lowering


class Mixed(torch.nn.Module):
    """A long 1-d conv (255 taps), a short one, and causal self-attention over the sequence."""

    def __init__(self):
        super().__init__()
        self.long = torch.nn.Conv1d(8, 8, 255, padding=127)
        self.short = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):
        y = self.short(self.long(x)).transpose(1, 2)
        q, k, v = self.qkv(y).reshape(y.shape[0], y.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    model = Mixed().eval()
    seq = torch.export.Dim("seq", min=16, max=8192)
    return itc.convert(model, (torch.randn(2, 8, 512),), dynamic_shapes=({2: seq},)), model


def by_family(prog, family):
    return [n for n in prog.transforms if n.family == family]


def test_every_lowering_of_the_pair_kernel_families_has_a_cost_rule():
    for family in ("dot_exp", "stationary"):
        missing = [r.name for r in lowerings(family) if r.cost is None]
        assert not missing, (family, missing)
        assert len(lowerings(family)) >= 5


def test_costs_are_symbolic_in_the_dynamic_sizes(mixed):
    prog, _ = mixed
    (attn,) = by_family(prog, "dot_exp")
    (seq,) = {s for s in attn.kwargs["q"].type.shape[2].free_symbols}

    def growth(expr):  # how a cost scales when the sequence doubles
        return evaluate(expr, {"seq": 8192}) / evaluate(expr, {"seq": 4096})

    costs = {name: cost_of(attn, name) for name in ("dense", "library", "fused", "montecarlo", "lowrank")}
    for cost in costs.values():
        assert isinstance(cost, Cost) and seq in cost.flops.free_symbols
    assert sympy.degree(sympy.expand(costs["dense"].bytes), seq) == 2  # materialises the L×L kernel
    assert sympy.degree(sympy.expand(costs["library"].bytes), seq) == 1  # O(N) memory traffic
    assert growth(costs["dense"].flops) == pytest.approx(4.0) and growth(costs["fused"].flops) == pytest.approx(4.0)
    assert growth(costs["montecarlo"].flops) < 2.2 and growth(costs["lowrank"].flops) < 2.2
    mc = cost_of(attn, "montecarlo:samples=64")
    assert mc.error.free_symbols == {seq}  # more columns, more error at a fixed sample count


def test_roofline_time_is_the_slower_of_compute_and_traffic():
    cost = Cost(sympy.Integer(10**9), sympy.Integer(10**8), sympy.Integer(0))
    assert Ceilings(1e9, 1e9).seconds(cost, {}) == pytest.approx(1.0)
    assert Ceilings(1e12, 1e7).seconds(cost, {}) == pytest.approx(10.0)
    assert math.isinf(evaluate(sympy.Symbol("s9") * 2, {}))


def test_exact_budget_chooses_exact_lowerings_by_cost(mixed):
    prog, _ = mixed
    planned = choose_lowering(prog.clone(), ChooseOptions(sizes={"seq": 4096}))
    chosen = {n.name: n.lowering for n in planned.transforms}
    assert chosen["long"] == "fft"  # 255 taps: the spectrum beats direct evaluation
    assert chosen["short"] == "library"
    (attn,) = by_family(planned, "dot_exp")
    assert attn.lowering == "library"
    record = planned.meta["lowering_choices"]
    assert all(r["error"] == 0 for r in record.values()) and record["long"]["lowering"] == "fft"
    assert "fft" in str(planned) and itc.parse(str(planned)) is not None


def test_forced_lowerings_are_left_alone(mixed):
    prog, _ = mixed
    p = prog.clone()
    for n in p.transforms:
        if n.name == "long":
            n.attrs = n.attrs.replace(lowering="fused")
    planned = choose_lowering(p, ChooseOptions())
    assert {n.name: n.lowering for n in planned.transforms}["long"] == "fused"


def test_choices_run_and_match_the_source_model(mixed):
    prog, model = mixed
    planned = choose_lowering(prog.clone(), ChooseOptions(sizes={"seq": 4096}))
    plan = {n.name: n.lowering for n in planned.transforms if n.layer}
    x = torch.randn(2, 8, 300)
    with torch.no_grad():
        out, ref = itc.build(prog, plan=plan)(x), model(x)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


def low_rank_conv(rank: int = 4, noise: float = 1e-3):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, rank, generator=g, dtype=torch.float64)
    b = torch.randn(rank, 64 * 9, generator=g, dtype=torch.float64)
    w = (a @ b + noise * torch.randn(64, 64 * 9, generator=g, dtype=torch.float64)).reshape(64, 64, 3, 3)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).double()
    conv.weight.data.copy_(w)
    return conv


def test_svd_error_is_the_weight_truncation_error():
    conv = low_rank_conv()
    w = conv.weight.detach()
    errs = svd_error(w, 1, False)
    u, s, vh = torch.linalg.svd(w.reshape(64, -1))
    for r in (1, 3, 4, 5, 20):
        approx = (u[:, :r] * s[:r]) @ vh[:r]
        want = ((approx - w.reshape(64, -1)).norm() / w.norm()).item()
        assert errs[r - 1] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert all(b <= a for a, b in zip(errs, errs[1:], strict=False)) and errs[-1] == 0.0


def test_a_budget_buys_a_low_rank_conv_whose_measured_error_meets_it():
    conv = low_rank_conv()
    x = torch.randn(1, 64, 32, 32, dtype=torch.float64)
    prog = itc.convert(conv, (x,))
    budget = 0.01
    planned = choose_lowering(prog.clone(), ChooseOptions(error_budget=budget))
    (node,) = planned.transforms
    assert node.lowering.startswith("lowrank:method=svd,rank=")
    rank = int(node.lowering.rsplit("=", 1)[1])
    assert rank == 4  # the smallest rank whose truncation error meets the budget
    assert planned.meta["lowering_choices"][node.name]["error"] <= budget
    with torch.no_grad():
        out = itc.build(prog, plan={node.name: node.lowering})(x)
        ref = conv(x)
    assert ((out - ref).norm() / ref.norm()).item() <= 1.5 * budget  # white input: the weight error carries over
    exact = choose_lowering(prog.clone(), ChooseOptions())
    assert exact.transforms[0].lowering == "library"


@pytest.mark.parametrize("budget", [0.5, 0.8])
def test_montecarlo_sample_count_from_the_budget_meets_it_when_measured(budget):
    """A long conv with a decaying kernel: the weight-aware sqrt((T_eff - 1)/M) model picks M and the norm proposal,
    and the measured error honours the budget."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(4, 4, 255, padding=127, bias=False).double()
    conv.weight.data *= torch.exp(-torch.arange(255, dtype=torch.float64) / 20)
    x = torch.randn(1, 4, 512, dtype=torch.float64)
    prog = itc.convert(conv, (x,))
    (node,) = prog.transforms
    weight = {"weight": conv.weight.detach()}.get
    fit = REGISTRY[("stationary", "montecarlo")].fit
    opts = fit(node, budget, {}, weight)
    m = opts["samples"]
    assert opts["proposal"] == "norm" and m < 255
    assert evaluate(cost_of(node, f"montecarlo:samples={m}", weight).error, {}) <= budget
    assert evaluate(cost_of(node, f"montecarlo:samples={m - 1}", weight).error, {}) > budget
    static = dict(stride=(1,), padding=((127, 127),), dilation=(1,), groups=1, transposed=False)
    static.update(output_padding=(0,), padding_mode="zeros")
    ref = conv(x).detach()

    def measured(seed: int) -> float:
        out = L.conv_montecarlo(x, conv.weight.detach(), None, **static, samples=m, proposal="norm", seed=seed)
        return ((out - ref).norm() / ref.norm()).item()

    assert sum(measured(s) for s in range(4)) / 4 <= 1.3 * budget
    assert fit(node, 0.0, {}, weight) is None  # no budget, no approximation
    assert fit(node, budget, {}, None) is None  # without the weight, the flat-kernel model needs M > T


def test_attention_montecarlo_needs_a_large_budget_to_be_a_candidate(mixed):
    prog, _ = mixed
    (attn,) = by_family(prog, "dot_exp")
    fit = REGISTRY[("dot_exp", "montecarlo")].fit
    assert fit(attn, 0.05, {"seq": 4096}, None) is None  # would need more samples than columns
    opts = fit(attn, 0.5, {"seq": 4096}, None)
    assert opts is not None and opts["samples"] < 4096


def test_cost_table_lists_every_applicable_lowering_at_the_sizes(mixed):
    from itnet_compiler.ir.cost import cost_table

    prog, _ = mixed
    (attn,) = by_family(prog, "dot_exp")
    rows = {r["lowering"]: r for r in cost_table(attn, {"seq": 1024})}
    assert set(rows) == {"dense", "library", "fused", "montecarlo", "lowrank", "hybrid"}
    assert rows["dense"]["bytes_at"] > 100 * rows["library"]["bytes_at"]
    assert rows["library"]["error_at"] == 0 and math.isinf(rows["lowrank"]["error_at"])


def test_build_with_error_budget_records_choices_and_module_reports_error_estimates():
    """Public path: build(error_budget=...) lets the cost model choose; a Monte Carlo layer chosen by plan reports
    its own error estimate through module.error_estimates, next to the true error against the exact build."""
    import itnet_compiler as itc

    torch.manual_seed(0)
    layer = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 64, 32)
    prog = itc.convert(layer, (x, x, x), kwargs={"need_weights": False})
    exact = itc.build(prog, error_budget=0.0)
    assert {t.lowering for t in exact.program.transforms} <= {"library", "fused", "dense"}
    assert "lowering_choices" in exact.program.meta
    mc = itc.build(prog, plan={"*": "montecarlo:samples=32,mode=per_row,seed=0"})
    out, ref = mc(x, x, x, need_weights=False)[0], exact(x, x, x, need_weights=False)[0]
    (est,) = mc.error_estimates.values()
    true = ((out - ref).norm() / ref.norm()).item()
    assert est["samples"] == 32 and 0 < est["rel"] < float("inf")
    assert 0 < true < float("inf")  # an estimate, not exact: the approximation is recorded, never silent
