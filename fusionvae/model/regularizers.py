"""Spectral regularisation of every weight-normalised conv and the BN-gamma L-inf penalty."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusionvae.model.host_copy import HostCopy
from fusionvae.model.layers import WNConv2d, stacked_weights


def power_iteration(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched power iteration on ``w [G, m, n]`` with unit vectors ``u [G, m]``, ``v [G, n]``."""
    for _ in range(steps):
        v = F.normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1), dim=1, eps=1e-3)  # w^T u
        u = F.normalize(torch.bmm(w, v.unsqueeze(2)).squeeze(2), dim=1, eps=1e-3)  # w v
    return u, v


class SpectralPenalty(nn.Module):
    """Sum of the largest singular values of all conv weights (as ``[out, in*k*k]`` matrices).

    Convs of equal shape are stacked and iterated in one batched call; the persistent u / v
    vectors are buffers, so they are saved in and restored from checkpoints.
    """

    def __init__(self, model: nn.Module, init_steps: int = 10, steps: int = 1):
        super().__init__()
        self.steps, self.init_steps = steps, init_steps
        by_shape: dict[tuple, list[WNConv2d]] = defaultdict(list)
        for mod in model.modules():
            if isinstance(mod, WNConv2d):
                by_shape[tuple(mod.weight.shape)].append(mod)
        # plain list, not submodules: the convs' parameters belong to the model
        self.groups = [convs for _, convs in sorted(by_shape.items())]
        for i, convs in enumerate(self.groups):
            w = self._weights(convs)
            self.register_buffer(f"u{i}", F.normalize(torch.randn(w.shape[:2]), dim=1))
            self.register_buffer(f"v{i}", F.normalize(torch.randn(w.shape[0], w.shape[2]), dim=1))
        self.register_buffer("initialised", torch.tensor(False))
        self._initialised = HostCopy()  # no device read per step

    @staticmethod
    def _weights(convs: list[WNConv2d]) -> torch.Tensor:
        """``[G, out, in k k]``: this step's normalised weights, reused from the forward pass."""
        return stacked_weights(convs)

    def start_step(self) -> None:
        """Forget the weights of the previous forward pass (call before each training forward: a
        compiled one gives none, and the regulariser must not see a validation pass's)."""
        for convs in self.groups:
            for conv in convs:
                conv.given_weight = conv.given_group = None

    def forward(self) -> torch.Tensor:
        first = not self._initialised.get(self.initialised)
        steps = self.init_steps if first else self.steps
        total = 0.0
        for i, convs in enumerate(self.groups):
            w = self._weights(convs).float()
            u, v = getattr(self, f"u{i}"), getattr(self, f"v{i}")
            if self.training:
                with torch.no_grad():
                    u, v = power_iteration(w.detach(), u, v, steps)
                    getattr(self, f"u{i}").copy_(u)
                    getattr(self, f"v{i}").copy_(v)
            total = total + torch.bmm(torch.bmm(u.unsqueeze(1), w), v.unsqueeze(2)).sum()  # sum_g u_g^T w_g v_g
        if self.training and first:
            self.initialised.fill_(True)
            # a skipped step puts the flag back (fusionvae.training.step): read it again next step
            # (a host read in the first steps only; later steps leave the flag as it is)
            self._initialised.forget()
        return total


class BatchNormPenalty(nn.Module):
    """Sum over BN layers of max |gamma|, in a few ops for all layers: their gammas side by side,
    one segmented max, one sum (a max per layer was two ops each, and its CPU backward read a
    device value into Python twice per layer). The segment lengths are a buffer, made once: a
    tensor made from a Python list each step would be a blocking host-to-device copy on a GPU."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = [model]  # a list, not a submodule: the gammas belong to the model
        lengths = [g.numel() for g in self._gammas()]
        self.register_buffer("lengths", torch.tensor(lengths, dtype=torch.long), persistent=False)

    def _gammas(self) -> list[torch.Tensor]:
        bns = (m for m in self.model[0].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        return [m.weight for m in bns if m.affine]

    def forward(self) -> torch.Tensor:
        gammas = self._gammas()
        if not gammas:
            return torch.zeros((), device=self.lengths.device)
        return torch.segment_reduce(torch.cat(gammas).abs(), "max", lengths=self.lengths, unsafe=True).sum()
