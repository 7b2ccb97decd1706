"""The public module-converter registry: a user block captured as one it.transform instead of being traced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import itnet_compiler as itc
from itnet_compiler.ir import StationaryAttrs, TensorType


class UnfoldConv(nn.Module):
    """A 2-d convolution written by hand (im2col + matmul): export would trace it into a dozen generic ops."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = F.unfold(x, self.k, padding=self.k // 2)
        y = self.weight.flatten(1) @ cols
        return y.view(n, -1, h, w)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = UnfoldConv(3, 8, 3)
        self.post = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.post(torch.relu(self.block(x)))


@pytest.fixture
def registered():
    @itc.register_converter(UnfoldConv)
    def convert_unfold(ctx: itc.ConverterContext, module: UnfoldConv, x: itc.Value):
        p = module.k // 2
        attrs = StationaryAttrs(rank=2, stride=(1, 1), padding=((p, p), (p, p)), dilation=(1, 1), output_padding=(0, 0))
        (y,) = ctx.transform(attrs, {"x": x, "weight": ctx.weight("weight")}, ctx.output_types)
        return y

    yield convert_unfold
    itc.unregister_converter(UnfoldConv)


def test_registered_module_becomes_one_transform(registered):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 10, 12)
    prog = itc.convert(model, (x,))
    layers = {t.layer: t.family for t in prog.transforms}
    assert layers == {"block": "stationary", "post": "stationary"}
    assert not any(n.op.startswith("aten.im2col") or "unfold" in n.op for n in prog.nodes)
    assert str(itc.parse(str(prog))) == str(prog)
    for low in ("library", "dense"):
        out = itc.build(prog, plan={"*": low})(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_converter_works_with_dynamic_sizes(registered):
    model = Net().eval()
    h = torch.export.Dim("h", min=4, max=64)
    prog = itc.convert(model, (torch.randn(2, 3, 10, 12),), dynamic_shapes={"x": {2: h}})
    t = next(t for t in prog.transforms if t.layer == "block")
    assert isinstance(t.outputs[0].type, TensorType) and str(t.outputs[0].type.shape[2]) == "h"
    mod = itc.build(prog)
    x = torch.randn(2, 3, 17, 12)
    torch.testing.assert_close(mod(x), model(x), rtol=1e-5, atol=1e-5)


def test_without_converter_the_block_is_traced_generically():
    model = Net().eval()
    prog = itc.convert(model, (torch.randn(2, 3, 10, 12),))
    assert [t.layer for t in prog.transforms] == ["post"]
    assert any(n.layer == "block" for n in prog.generic_nodes())


def test_failing_converter_names_the_layer():
    @itc.register_converter(UnfoldConv)
    def broken(ctx, module, x):
        return ctx.weight("no_such_weight")

    try:
        with pytest.raises(itc.ItnetError, match="layer 'block'.*no parameter or buffer 'no_such_weight'"):
            itc.convert(Net().eval(), (torch.randn(1, 3, 8, 8),))
    finally:
        itc.unregister_converter(UnfoldConv)
