"""Mamba mixers recognised by structure: FalconMamba (weightless RMS norms on dt, B, C) and Jamba (weighted norms,
attention layers between) built offline from small configs, renamed copies of HF's mixers, and look-alikes that must
be traced instead. Each converted model is checked against eager at two lengths on the torch backend and on the
Triton backend (the interpreter on the CPU) with no fallback."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import hypothesis  # noqa: E402,F401  (loaded up front: the Triton interpreter walks module members)
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.frontend import converters as conv_registry  # noqa: E402
from itnet_compiler.frontend.mamba_structure import is_mamba2_mixer, is_mamba_mixer, mamba_norms  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 64, "use_cache": False}
LENGTHS = (9, 17)


def _seq() -> dict[str, object]:
    return {"input_ids": {1: torch.export.Dim("L", min=2, max=128)}}


def falcon_mamba() -> nn.Module:
    torch.manual_seed(0)
    return transformers.FalconMambaModel(transformers.FalconMambaConfig(**SMALL, state_size=4, time_step_rank=4))


def jamba() -> nn.Module:
    """Four layers: Mamba, attention, Mamba, attention (one expert: plain MLPs). The norm weights are moved off one,
    so that a converter ignoring them would be caught."""
    torch.manual_seed(0)
    cfg = transformers.JambaConfig(
        **{**SMALL, "num_hidden_layers": 4}, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        mamba_d_state=4, mamba_dt_rank=4, mamba_expand=2, attn_layer_period=2, attn_layer_offset=1,
        expert_layer_period=100, num_experts=1,
    )  # fmt: skip
    model = transformers.JambaModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_layernorm" in name:
                p.mul_(torch.rand(p.shape) + 0.5)
    return model


class RenamedMambaMixer(nn.Module):
    """HF's MambaMixer under another name and outside its class hierarchy (instances are made by re-classing one)."""

    forward = transformers.models.mamba.modeling_mamba.MambaMixer.forward


class RenamedMamba2Mixer(nn.Module):
    forward = transformers.models.mamba2.modeling_mamba2.Mamba2Mixer.forward


def renamed(version: int) -> nn.Module:
    torch.manual_seed(0)
    if version == 1:
        model = transformers.MambaModel(transformers.MambaConfig(**SMALL, state_size=4, time_step_rank=4))
    else:
        cfg = transformers.Mamba2Config(**SMALL, state_size=4, num_heads=8, head_dim=8, n_groups=2, chunk_size=4)
        model = transformers.Mamba2Model(cfg)
    for layer in model.layers:
        for klass in (RenamedMambaMixer, RenamedMamba2Mixer):
            if klass.forward is type(layer.mixer).forward:
                layer.mixer.__class__ = klass
    assert all(type(layer.mixer).__name__.startswith("Renamed") for layer in model.layers)
    return model


MODELS = {
    "falcon-mamba": (falcon_mamba, {"stationary": 2, "ssm": 2}),
    "jamba": (jamba, {"stationary": 2, "ssm": 2, "dot_exp": 2}),
    "renamed-mamba": (lambda: renamed(1), {"stationary": 2, "ssm": 2}),
    "renamed-mamba2": (lambda: renamed(2), {"stationary": 2, "ssm": 2}),
}


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request) -> tuple[nn.Module, itc.Program, dict[str, int]]:
    make, families = MODELS[request.param]
    model = make().train(False)
    return model, itc.convert(model, (torch.randint(0, 64, (2, 11)),), dynamic_shapes=_seq()), families


def _counts(prog: itc.Program) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in prog.transforms:
        out[t.family] = out.get(t.family, 0) + 1
    return out


def _check(model: nn.Module, mod: object) -> None:
    g = torch.Generator().manual_seed(1)
    for n in LENGTHS:
        ids = torch.randint(0, 64, (2, n), generator=g)
        with torch.no_grad():
            out, ref = mod(ids).last_hidden_state, model(ids).last_hidden_state
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_every_mixer_is_one_ssm_and_one_conv(converted) -> None:
    model, prog, families = converted
    assert _counts(prog) == families
    mixers = {t.layer for t in prog.transforms if t.family == "ssm"}
    assert len(mixers) == families["ssm"] and all(m.endswith(("mixer", "mamba")) for m in mixers)
    assert list(prog.symbols) == ["L"]


def test_torch_backend_matches_eager_at_two_lengths(converted) -> None:
    model, prog, _ = converted
    _check(model, itc.build(prog))


def test_triton_backend_matches_eager_with_no_fallback(converted) -> None:
    model, prog, _ = converted
    mod = itc.build(prog, backend="triton")
    _check(model, mod)
    assert mod.fallbacks == {}


def test_norms_are_read_from_structure() -> None:
    falcon, jam = falcon_mamba(), jamba()
    f = mamba_norms(falcon.layers[0].mixer)
    j = mamba_norms(jam.layers[0].mamba)
    assert set(f) == set(j) == {"dt_layernorm", "b_layernorm", "c_layernorm"}
    assert not any(n.weighted for n in f.values()) and all(n.weighted for n in j.values())
    assert mamba_norms(transformers.MambaModel(transformers.MambaConfig(**SMALL)).layers[0].mixer) == {}


# ---------------------------------------------------------------------------------------------------- look-alikes


class LookAlike(nn.Module):
    """Every parameter and attribute of a Mamba mixer, but ``extra`` (a LayerNorm) makes it another computation."""

    def __init__(self, inner: int = 16, n: int = 4, rank: int = 2, hidden: int = 8):
        super().__init__()
        self.intermediate_size, self.ssm_state_size, self.time_step_rank, self.activation = inner, n, rank, "silu"
        self.A_log = nn.Parameter(torch.randn(inner, n))
        self.D = nn.Parameter(torch.randn(inner))
        self.in_proj = nn.Linear(hidden, 2 * inner)
        self.conv1d = nn.Conv1d(inner, inner, 4, groups=inner, padding=3)
        self.x_proj = nn.Linear(inner, rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(rank, inner)
        self.out_proj = nn.Linear(inner, hidden)
        self.extra = nn.LayerNorm(inner)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(hidden_states).chunk(2, -1)
        x = self.conv1d(x.transpose(1, 2))[..., : hidden_states.shape[1]].transpose(1, 2)
        return self.out_proj(self.extra(x) * torch.sigmoid(z) * self.D)


class LayerNormed(LookAlike):
    """A mixer structure with a LayerNorm (mean-centred, not an RMS norm) on dt."""

    def __init__(self):
        super().__init__()
        del self.extra
        self.dt_layernorm = nn.LayerNorm(self.time_step_rank)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(hidden_states).chunk(2, -1)
        return self.out_proj(x * torch.sigmoid(z) * self.dt_layernorm.weight.mean())


@pytest.mark.parametrize("cls", [LookAlike, LayerNormed])
def test_a_look_alike_is_traced_not_captured(cls) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(cls()).train(False)
    assert not is_mamba_mixer(model[0]) and not is_mamba2_mixer(model[0])
    x = torch.randn(2, 7, 8)
    prog = itc.convert(model, (x,))
    assert "ssm" not in _counts(prog)
    with torch.no_grad():
        torch.testing.assert_close(itc.build(prog)(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_users_class_converter_takes_precedence_over_structure() -> None:
    model = renamed(1).train(False)
    seen = []

    @itc.register_converter(RenamedMambaMixer)
    def convert(ctx, module, *inputs):
        seen.append(ctx.layer)
        return conv_registry._STRUCTURAL["mamba-mixer"][1](ctx, module, *inputs)

    try:
        prog = itc.convert(model, (torch.randint(0, 64, (2, 6)),))
    finally:
        itc.unregister_converter(RenamedMambaMixer)
    assert seen == ["layers.0.mixer", "layers.1.mixer"] and _counts(prog)["ssm"] == 2


def test_structural_converters_are_a_general_registry() -> None:
    """A user rule by structure: every module holding a ``scale`` parameter becomes x · scale written by hand."""

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(3.0))

        def forward(self, x):
            return x * self.scale

    def convert(ctx, module, x):
        return ctx.op("aten.mul.Tensor", [x, ctx.weight("scale")], None, ctx.output_types)[0]

    conv_registry.register_structural_converter("scale", lambda m: isinstance(getattr(m, "scale", None), nn.Parameter),
                                                convert)  # fmt: skip
    try:
        model = nn.Sequential(Scale()).train(False)
        assert conv_registry.converter_for(model[0]) is convert and conv_registry.converter_for(model) is None
        x = torch.randn(3)
        torch.testing.assert_close(itc.build(itc.convert(model, (x,)))(x), model(x))
    finally:
        conv_registry.unregister_structural_converter("scale")
    assert conv_registry.converter_for(model[0]) is None
