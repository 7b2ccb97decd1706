"""3-d convolutions on the Triton backend (through the interpreter on the CPU): the ``stationary`` kernels against
``torch.nn.functional.conv3d`` / ``conv_transpose3d`` in float64 for outputs and every gradient, over dense, grouped,
depthwise, strided, dilated, transposed and non-zero padding-mode geometries; and a model of 3-d layers that builds
on the Triton backend with no fallback and trains."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.backends.triton import conv as tri_conv  # noqa: E402

DEVICE = "cuda" if os.environ.get("ITNET_TEST_GPU") else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _reference(x, w, b, stride, padding, dilation, groups, transposed, output_padding, mode):
    """The float64 oracle, written with torch.nn.functional directly (not itnet's torch backend)."""
    if transposed:
        lo = tuple(p for p, _ in padding)
        return F.conv_transpose3d(x, w, b, stride, lo, output_padding, groups, dilation)
    x = F.pad(x, [p for lo_hi in reversed(padding) for p in lo_hi], mode="constant" if mode == "zeros" else mode)
    return F.conv3d(x, w, b, stride, 0, dilation, groups)


CASES = [
    # c_in, c_out, size (D, H, W), kernel, stride, dilation, padding ((lo, hi) per dim), groups, transposed,
    # output_padding, padding_mode
    (3, 5, (5, 6, 5), (3, 3, 3), (1, 2, 2), (1, 1, 1), ((1, 1),) * 3, 1, False, (0, 0, 0), "zeros"),  # dense, bias
    (4, 6, (6, 5, 7), (2, 3, 2), (2, 1, 2), (2, 1, 1), ((1, 0), (1, 1), (0, 1)), 2, False, (0, 0, 0), "zeros"),
    (4, 4, (5, 6, 6), (3, 3, 3), (2, 1, 2), (1, 2, 1), ((1, 1), (2, 2), (1, 1)), 4, False, (0, 0, 0), "zeros"),
    (4, 4, (4, 5, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1), ((1, 1),) * 3, 4, False, (0, 0, 0), "reflect"),  # depthwise
    (3, 4, (4, 5, 4), (3, 2, 3), (1, 1, 1), (1, 1, 1), ((1, 1), (1, 0), (1, 1)), 1, False, (0, 0, 0), "circular"),
    (2, 4, (4, 4, 5), (1, 3, 3), (1, 1, 1), (1, 1, 1), ((0, 0), (1, 1), (1, 1)), 2, False, (0, 0, 0), "replicate"),
    (4, 6, (3, 4, 3), (3, 3, 2), (2, 2, 1), (1, 1, 2), ((1, 1), (1, 1), (0, 0)), 2, True, (1, 0, 0), "zeros"),
    (3, 2, (3, 3, 4), (2, 3, 3), (3, 1, 2), (1, 1, 1), ((0, 0), (1, 1), (1, 1)), 1, True, (2, 0, 1), "zeros"),
]


def _ids(c):
    kind = "t" if c[8] else ("dw" if c[7] == c[0] == c[1] else f"g{c[7]}")
    return f"{kind}-k{''.join(map(str, c[3]))}-s{''.join(map(str, c[4]))}-{c[10]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_conv3d_kernels_match_torch_forward_and_gradients(case, dtype):
    cin, cout, size, k, s, d, pad, groups, transposed, op, mode = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, *size, generator=g)
    wshape = (cin, cout // groups, *k) if transposed else (cout, cin // groups, *k)
    w = torch.randn(*wshape, generator=g) * 0.5
    b = torch.randn(cout, generator=g)
    static = dict(stride=s, padding=pad, dilation=d, groups=groups, transposed=transposed, output_padding=op,
                  padding_mode=mode)  # fmt: skip
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (x, w, b)]
    y = tri_conv.stationary_conv(*leaves, **static)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b)]
    ref = _reference(*ref_leaves, s, pad, d, groups, transposed, op, mode)
    dy = torch.randn(ref.shape, generator=g)
    grads = torch.autograd.grad(y, leaves, dy.to(DEVICE, dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
    tol = 1e-4 if dtype == torch.float32 else 3e-3
    assert y.shape == ref.shape and y.dtype == dtype and _rel(y.cpu(), ref) <= tol
    for name, a, r in zip(("dx", "dw", "db"), grads, ref_grads, strict=True):
        assert a.shape == r.shape and _rel(a.cpu(), r) <= tol, name


def test_depthwise_conv3d_takes_the_depthwise_kernel_and_matches_without_bias():
    """A depthwise layer dispatches to the direct kernel (not the implicit GEMM); no bias means no bias gradient."""
    assert tri_conv.is_depthwise(torch.empty(1, 3, 2, 2, 2), torch.empty(3, 1, 3, 3, 3), 3, False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 7, 4, 6, generator=g, dtype=torch.float64)
    w = torch.randn(3, 1, 3, 1, 2, generator=g, dtype=torch.float64)
    static = dict(stride=(2, 1, 1), padding=((2, 1), (0, 0), (1, 0)), dilation=(2, 1, 3), groups=3,
                  transposed=False, output_padding=(0, 0, 0), padding_mode="zeros")  # fmt: skip
    xs, ws = (t.float().requires_grad_() for t in (x, w))
    y = tri_conv.depthwise_conv(xs, ws, None, **static)
    xr, wr = (t.clone().requires_grad_() for t in (x, w))
    ref = _reference(xr, wr, None, (2, 1, 1), static["padding"], (2, 1, 3), 3, False, (0, 0, 0), "zeros")
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(y, (xs, ws), dy.float())
    ref_grads = torch.autograd.grad(ref, (xr, wr), dy)
    assert _rel(y, ref) <= 1e-5 and all(_rel(a, r) <= 1e-5 for a, r in zip(grads, ref_grads, strict=True))


class _Volume(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1)
        self.depthwise = nn.Conv3d(4, 4, 3, padding=1, groups=4, padding_mode="replicate")
        self.up = nn.ConvTranspose3d(4, 3, 3, stride=2, padding=1, output_padding=(1, 0, 1), groups=1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.depthwise(torch.relu(self.down(v)))))


def test_3d_model_builds_on_triton_with_no_fallback_and_trains():
    torch.manual_seed(0)
    model = _Volume().eval()
    args = (torch.randn(1, 2, 3, 6, 6),)
    mod = itc.build(itc.convert(model, args), backend="triton")
    out = mod(*args)
    ref = model(*args)
    assert mod.fallbacks == {}
    assert out.shape == ref.shape and _rel(out, ref) <= 1e-5
    r = torch.randn_like(ref)
    (out * r).sum().backward()
    (ref * r).sum().backward()
    ref_params = dict(model.named_parameters())
    for name, p in mod.gm.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [2, 3])
def test_weight_gradient_split_over_k_matches_torch(rank):
    """The weight gradient's K loop shared by several programs (one fp32 slice each, summed) gives the same result."""
    g = torch.Generator().manual_seed(2)
    size, k = (4, 5, 7)[3 - rank :], (3, 2, 3)[3 - rank :]
    x = torch.randn(3, 4, *size, generator=g, dtype=torch.float64)
    w = torch.randn(6, 2, *k, generator=g, dtype=torch.float64)
    static = dict(stride=(1,) * rank, padding=((1, 1),) * rank, dilation=(1,) * rank, groups=2, transposed=False,
                  output_padding=(0,) * rank, padding_mode="zeros")  # fmt: skip
    xs, ws = (t.float().requires_grad_() for t in (x, w))
    y = tri_conv.direct_conv(xs, ws, None, **static, split_k=3)
    xr, wr = (t.clone().requires_grad_() for t in (x, w))
    ref = (F.conv2d if rank == 2 else F.conv3d)(xr, wr, None, 1, 1, 1, 2)
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (dw,) = torch.autograd.grad(y, (ws,), dy.float())
    (dw_ref,) = torch.autograd.grad(ref, (wr,), dy)
    assert _rel(y, ref) <= 1e-5 and _rel(dw, dw_ref) <= 1e-5
