"""A small CNN with every convolution variant itnet recognises: grouped, depthwise, dilated, strided, 'same',
reflect/replicate/circular padding, 1d/3d and transposed convolutions. ``make_model()`` returns (model, inputs)."""

import torch
from torch import nn


class VariantCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(16, 32, 3, padding=2, dilation=2, groups=4)
        self.depthwise = nn.Conv2d(32, 32, 5, padding="same", groups=32, padding_mode="reflect")
        self.same_even = nn.Conv2d(32, 16, 4, padding="same", bias=False)
        self.circular = nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular")
        self.replicate = nn.Conv2d(16, 16, (3, 1), padding=(1, 0), padding_mode="replicate")
        self.up = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1)
        self.up_grouped = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=2, dilation=1)
        self.seq = nn.Conv1d(8, 8, 3, stride=2, dilation=2, padding=2)
        self.vol = nn.Conv3d(1, 4, 3, padding=1, stride=(1, 2, 2))
        self.head = nn.Linear(8 + 4, 10)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.grouped(x))
        x = self.depthwise(x)
        x = self.same_even(x)
        x = self.circular(x) + self.replicate(x)
        x = self.up_grouped(torch.relu(self.up(x)))
        s = self.seq(x.flatten(2))
        y = self.vol(v)
        return self.head(torch.cat([s.mean(-1), y.mean((2, 3, 4))], dim=1))


def make_model():
    torch.manual_seed(0)
    return VariantCNN().eval(), (torch.randn(2, 3, 32, 32), torch.randn(2, 1, 6, 8, 8))
