"""The Triton backend covers every (family, lowering) the torch backend implements: each has a generated kernel or is
a vendor-library / reference lowering by design (and then runs without a fallback warning). A delegate is a lowering
name ("fft": every family's) or one family's lowering ("mlp:montecarlo")."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import torch  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.backends.torch.registry import LOWERINGS as TORCH_LOWERINGS  # noqa: E402
from itnet_compiler.backends.triton.codegen import KERNELS, TARGET, TORCH_BY_DESIGN  # noqa: E402
from itnet_compiler.ir.target import get_target  # noqa: E402


def test_every_torch_lowering_has_a_triton_kernel_or_is_a_library_by_design():
    get_target("triton")
    missing = sorted(key for key in TORCH_LOWERINGS if key not in KERNELS and not TARGET.delegated(*key))
    assert missing == [], f"no Triton kernel for {missing}"
    assert "mlp:montecarlo" in TORCH_BY_DESIGN and TARGET.delegated("mlp", "montecarlo")
    # a family-qualified delegate of a lowering that has a kernel would hide the kernel's tiles (TARGET.tiles)
    shadowed = sorted(d for d in TORCH_BY_DESIGN if ":" in d and tuple(d.split(":")) in KERNELS)
    assert shadowed == [], f"delegated although a Triton kernel exists: {shadowed}"
    assert "block_m" in TARGET.tiles("mlp", "fused")


def test_a_family_qualified_delegate_names_one_family_only(monkeypatch):
    get_target("triton")
    assert TARGET.delegated("stationary", "fft")  # a bare name: every family's
    monkeypatch.setattr(TARGET, "delegates", ("stationary:fft",))
    assert TARGET.delegated("stationary", "fft") and not TARGET.delegated("mlp", "montecarlo")
    assert not TARGET.delegated("stationary", "library") and not TARGET.can_run("mlp", "montecarlo")


def test_a_by_design_lowering_runs_on_the_triton_backend_without_a_fallback():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 33, padding=16), torch.nn.GELU()).eval()
    x = torch.randn(2, 4, 64)
    prog = itc.convert(model, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        mod = itc.build(prog, backend="triton", plan={"*": "fft"})
        out = mod(x)
    assert mod.fallbacks == {} and [t.lowering for t in mod.program.transforms] == ["fft"]
    ref = model(x)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
