"""NVAE residual cells: every cell is ``skip(x) + 0.1 * SE(branch(x))``."""

from __future__ import annotations

import torch
import torch.nn as nn

from fusionvae.model.layers import FactorizedReduce, SqueezeExcite, UpSkip, batch_norm, conv

RESIDUAL_SCALE = 0.1


class Cell(nn.Module):
    def __init__(self, skip: nn.Module, branch: nn.Sequential, c_out: int, use_se: bool):
        super().__init__()
        self.skip = skip
        self.branch = branch
        self.se = SqueezeExcite(c_out) if use_se else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + RESIDUAL_SCALE * self.se(self.branch(x))


def encoder_cell(c_in: int, down: bool = False, use_se: bool = True) -> Cell:
    """[BN-Swish-Conv3x3] x 2; ``down`` halves the resolution and doubles the channels."""
    c_out = 2 * c_in if down else c_in
    branch = nn.Sequential(
        batch_norm(c_in),
        nn.SiLU(),
        conv(c_in, c_out, 3, stride=2 if down else 1),
        batch_norm(c_out),
        nn.SiLU(),
        conv(c_out, c_out, 3),
    )
    skip = FactorizedReduce(c_in, c_out) if down else nn.Identity()
    return Cell(skip, branch, c_out, use_se)


def decoder_cell(c_in: int, up: bool = False, expand: int = 6, use_se: bool = True) -> Cell:
    """MBConv: BN -> 1x1 expand -> BN-Swish -> depthwise 5x5 -> BN-Swish -> 1x1 -> BN.
    ``up`` doubles the resolution (nearest, before the expansion) and halves the channels."""
    c_out = c_in // 2 if up else c_in
    hidden = c_in * expand
    layers = [nn.Upsample(scale_factor=2, mode="nearest")] if up else []
    layers += [
        batch_norm(c_in),
        conv(c_in, hidden, 1, bias=False),
        batch_norm(hidden),
        nn.SiLU(),
        conv(hidden, hidden, 5, groups=hidden, bias=False),
        batch_norm(hidden),
        nn.SiLU(),
        conv(hidden, c_out, 1, bias=False),
        batch_norm(c_out),
    ]
    skip = UpSkip(c_in, c_out) if up else nn.Identity()
    return Cell(skip, nn.Sequential(*layers), c_out, use_se)
