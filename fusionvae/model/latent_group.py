"""One latent group of the FusionVAE decoder (docs/design.md §1): everything z_l needs in one module.

A group runs its decoder cells on the state s and forms f_k = e_k + Conv1x1(s) for every slot.
The posterior is the group's head on the target's f. The prior combines the K views where
``aggregation_level`` says: ``features`` pools f_1..f_K first and applies the head once,
``params`` applies the head to every view and fuses the K Normals (``fusionvae.model.aggregation``).
K = 0 gets the unconditional prior. Then z is drawn and combined with s.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from fusionvae.model.aggregation import aggregate_params, pool_features
from fusionvae.model.distributions import Normal, soft_clamp
from fusionvae.model.layers import conv

DRAWS = ("posterior", "prior", "mean")  # z from q(z|x,y), from p(z|x) at temperature t, or p's mean


class LatentGroup(nn.Module):
    """Decoder cells, projection of s onto the encoder features, the per-slot head, the K = 0 prior
    head (none for the top group, whose K = 0 prior is N(0, I)) and the z combiner."""

    def __init__(
        self, cells: nn.Sequential, ch: int, z_ch: int, top: bool, aggregation: str, level: str, res_dist: bool
    ):
        super().__init__()
        self.cells = cells
        self.enc_proj = conv(ch, ch, 1)
        self.head = conv(ch, 2 * z_ch, 3)
        self.prior_head = None if top else nn.Sequential(nn.ELU(), conv(ch, 2 * z_ch, 1))
        self.combiner = conv(ch + z_ch, ch, 1)
        self.z_ch, self.aggregation, self.level, self.res_dist = z_ch, aggregation, level, res_dist

    def head_outputs(self, s: torch.Tensor, slot_feats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw head outputs of ``slot_feats [n, slots, ch, h, w]`` (K views, then maybe the target):
        the views' ``[n, V, 2 z_ch, h, w]`` (V = K at the params level; V = 1, the pooled features,
        at the features level; V = 0 for K = 0) and the target's ``[n, 2 z_ch, h, w]`` (empty
        without a target). One head call for all of them."""
        f = slot_feats + self.enc_proj(s).unsqueeze(1)
        # split, not two slices: one backward op (a cat) instead of zeros + copy per slice
        if self.level == "features" and k > 0:
            seen, rest = f.split([k, f.shape[1] - k], dim=1)
            f = torch.cat([pool_features(seen, self.aggregation).unsqueeze(1), rest], dim=1)
        views = min(k, 1) if self.level == "features" else k
        n, slots = f.shape[:2]
        out = self.head(f.flatten(0, 1)).view(n, slots, 2 * self.z_ch, *f.shape[3:])
        view_out, target_out = out.split([views, slots - views], dim=1)
        return view_out, target_out.squeeze(1)

    def prior(self, s: torch.Tensor, view_out: torch.Tensor | None) -> Normal:
        """p(z_l | z_<l, x) from the views' head outputs, or the unconditional prior without views."""
        if view_out is not None and view_out.shape[1] > 0:
            if self.level == "features":
                return Normal.from_params(view_out[:, 0])
            return aggregate_params(view_out, self.aggregation)
        if self.prior_head is None:
            return Normal.standard((s.shape[0], self.z_ch, *s.shape[2:]), s.device)
        return Normal.from_params(self.prior_head(s))

    def posterior(self, params: torch.Tensor, prior: Normal) -> Normal:
        """q(z_l | z_<l, x, y) from the target slot's raw outputs (residual to the prior if ``res_dist``)."""
        if not self.res_dist:
            return Normal.from_params(params)
        d_mu, d_log_sigma = params.float().chunk(2, dim=1)
        return Normal(prior.mu + soft_clamp(d_mu), prior.sigma * soft_clamp(d_log_sigma).exp())

    def forward(
        self,
        s: torch.Tensor,
        slot_feats: torch.Tensor | None,
        k: int,
        draw: str,
        t: float,
        stats,
        run_cells=lambda cells, x: cells(x),
    ) -> torch.Tensor:
        """The next decoder state; adds this group's KL, log q(z), log p(z) and prior to ``stats``.

        ``slot_feats [n, slots, ch, h, w]`` holds the K views, then the target when ``draw`` is
        "posterior"; None when there are no slots. ``run_cells(cells, s)`` runs the decoder cells
        (the network passes its activation-checkpointing runner).
        """
        s = run_cells(self.cells, s)
        views, target = (None, None) if slot_feats is None else self.head_outputs(s, slot_feats, k)
        prior = self.prior(s, views)
        no_kl = stats.log_q.new_zeros(s.shape[0])
        if draw == "mean":
            z, kl = prior.mu, no_kl
        elif draw == "posterior":
            q = self.posterior(target, prior)
            z = q.sample(t)
            kl = q.kl(prior).flatten(1).sum(1)
            stats.log_q = stats.log_q + q.log_prob(z).flatten(1).sum(1)
        else:
            z, kl = prior.sample(t), no_kl
        if draw != "mean":
            stats.log_p = stats.log_p + prior.log_prob(z).flatten(1).sum(1)
        stats.kl.append(kl)
        stats.priors.append(prior)
        return self.combiner(torch.cat([s, z.to(s.dtype)], dim=1))


_LEGACY = re.compile(r"(dec_cells|enc_proj|heads|prior_heads|combiners)\.(\d+)\.")
_RENAMED = {
    "dec_cells": "cells",
    "enc_proj": "enc_proj",
    "heads": "head",
    "prior_heads": "prior_head",
    "combiners": "combiner",
}


def legacy_key_map(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: rename the keys of checkpoints written before ``LatentGroup``
    (five parallel lists ``dec_cells.{l}``, ``enc_proj.{l}``, ... -> ``latent_groups.{l}.*``)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = _LEGACY.match(key, len(prefix))
        if match:
            name, index = match.groups()
            new = f"{prefix}latent_groups.{index}.{_RENAMED[name]}.{key[match.end() :]}"
            state_dict[new] = state_dict.pop(key)
