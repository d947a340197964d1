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

    Inside the network the weights of all convs are normalised together at the start of each
    forward pass (``normalise_together``, a few ops per weight shape); the spectral regulariser
    reuses that step's stacked weights (``given_group``); ``SpectralPenalty.start_step`` clears
    them. A conv used on its own normalises its weight itself (``normalized_weight``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            norm = self.weight.flatten(1).norm(dim=1).clamp_min(1e-5)
        self.log_g = nn.Parameter(norm.log().view(-1, 1, 1, 1))
        self.given_weight: torch.Tensor | None = None  # set by normalise_together (the network's forward)
        self.given_group: tuple[torch.Tensor, int, bool] | None = None  # (stacked weights, index, channels_last)

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the weights of the last forward pass (tensors of its graph)."""
        return {**self.__dict__, "given_weight": None, "given_group": None}

    def normalized_weight(self) -> torch.Tensor:
        v = self.weight
        norm = v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return self.log_g.exp() * v / (norm + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.normalized_weight() if self.given_weight is None else self.given_weight
        return self._conv_forward(x, w, self.bias)


def weight_norm_groups(module: nn.Module) -> list[list[WNConv2d]]:
    """``module``'s weight-normalised convs, grouped by weight shape and layout."""
    groups: dict[tuple, list[WNConv2d]] = {}
    for m in module.modules():
        if isinstance(m, WNConv2d):
            groups.setdefault((tuple(m.weight.shape), _channels_last(m.weight)), []).append(m)
    return list(groups.values())


def _channels_last(w: torch.Tensor) -> bool:
    """Whether ``w [out, in, kh, kw]`` has channels_last strides, judged by the strides themselves:
    depthwise ([out, 1, k, k]) and 1x1 weights are contiguous in both layouts, but the conv kernels
    (and inductor's layout choice in backward) follow their strides."""
    _, c, _, kw = w.shape
    return w.stride()[1:] == (1, kw * c, c)


def _normalise_group(convs: list[WNConv2d]) -> tuple[torch.Tensor, bool]:
    """``exp(log_g) * v / ||v||`` of every conv in ``convs`` (one shape and layout) with a few ops for
    all of them: their weights stacked (channels_last ones as [out, k, k, in], so each result keeps
    its layout), one norm, one scale. Returns the stack ``[G, out, ...]`` and whether it is
    channels_last."""
    last = _channels_last(convs[0].weight)
    v = torch.stack([c.weight.permute(0, 2, 3, 1) if last else c.weight for c in convs])
    log_g = torch.stack([c.log_g.view(-1) for c in convs])  # [G, out]
    scale = log_g.exp() / (v.flatten(2).norm(dim=2) + 1e-5)
    return v * scale.view(*scale.shape, *([1] * (v.dim() - 2))), last


def normalise_together(groups: list[list[WNConv2d]]) -> None:
    """Give every conv in ``groups`` (``weight_norm_groups``) its normalised weight, computed per
    group: a few ops per weight shape instead of a few per conv (on a GPU each op is a kernel
    launch). They are used until the next call, also by a recomputation in backward (activation
    checkpointing); the network calls this at the start of each forward pass."""
    for convs in groups:
        stack, last = _normalise_group(convs)
        for i, (conv_, w) in enumerate(zip(convs, stack.unbind(0))):
            conv_.given_weight = w.permute(0, 3, 1, 2) if last else w
            conv_.given_group = (stack, i, last)


def stacked_weights(convs: list[WNConv2d]) -> torch.Tensor:
    """``[G, out, in k k]``: the normalised weights of ``convs`` (one shape), the stack this step's
    forward pass made when it holds exactly these convs in this order (one copy for all), else
    normalised here."""
    given = [c.given_group for c in convs]
    if all(g is not None for g in given) and all(g[0] is given[0][0] and g[1] == i for i, g in enumerate(given)):
        stack, _, last = given[0]
        if stack.shape[0] == len(convs):
            return (stack.permute(0, 1, 4, 2, 3) if last else stack).reshape(len(convs), stack.shape[1], -1)
    return torch.stack([c.normalized_weight().flatten(1) for c in convs])


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
