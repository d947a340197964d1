"""Building blocks: weight-normalised conv, squeeze-excitation, BN, resampling skips."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_MOMENTUM = 0.05


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)


class WNConv2d(nn.Conv2d):
    """Conv2d with weight normalisation: ``w = exp(log_g) * v / ||v||`` per output channel.

    ``normalized_weight()`` is also what the spectral regulariser penalises; a training forward
    keeps the ``w`` it computed (``last_weight``) so the regulariser reuses it instead of
    normalising every weight again (``SpectralPenalty.start_step`` clears it each step).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            norm = self.weight.flatten(1).norm(dim=1).clamp_min(1e-5)
        self.log_g = nn.Parameter(norm.log().view(-1, 1, 1, 1))
        self.last_weight: torch.Tensor | None = None

    def normalized_weight(self) -> torch.Tensor:
        v = self.weight
        norm = v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return self.log_g.exp() * v / (norm + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.normalized_weight()
        if self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self.last_weight = w  # (under torch.compile the regulariser normalises again: no side effect)
        return self._conv_forward(x, w, self.bias)


def conv(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1, bias: bool = True) -> WNConv2d:
    return WNConv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=bias)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s[:, :, None, None]


class FactorizedReduce(nn.Module):
    """Stride-2 skip path that doubles channels: 1x1 convs on the four pixel phases (even/odd
    rows x even/odd columns), concatenated. Sub-sampling by slicing and a stride-1 conv equals a
    stride-2 1x1 conv, and avoids a heap corruption of torch 2.14's CPU kernel for strided 1x1
    convs on channels_last inputs."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        if c_out % 4:
            raise ValueError(f"FactorizedReduce needs c_out divisible by 4, got {c_out}")
        self.convs = nn.ModuleList(conv(c_in, c_out // 4, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(x)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        phases = (x[:, :, ::2, ::2], x[:, :, 1::2, 1::2], x[:, :, ::2, 1::2], x[:, :, 1::2, ::2])
        return torch.cat([c(p.contiguous(memory_format=fmt)) for c, p in zip(self.convs, phases)], dim=1)


class UpSkip(nn.Module):
    """Up-sampling skip path that halves channels: nearest x2, then 1x1 conv."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = conv(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
