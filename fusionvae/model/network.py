"""FusionVAE: NVAE-style hierarchical conditional VAE fusing K views into samples of the target
(docs/design.md §1).

The bottom-up encoder runs on all views and the target at once (folded into the batch, shared
weights). Each ``LatentGroup`` of the top-down decoder forms ``f_k = e_k + Conv1x1(s)`` per slot:
the prior combines the K views (pooled features or fused Normals, ``aggregation_level``), the
posterior uses the target.

Glossary: K = number of input views; slot = one image of the folded stack (K views, then the
target when given); group = one latent variable z_l; scale = one resolution of the hierarchy;
t = sampling temperature; s = decoder state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from fusionvae.model import activation_checkpoint as checkpointing
from fusionvae.model.aggregation import pool_features
from fusionvae.model.cells import decoder_cell, encoder_cell
from fusionvae.model.distributions import LIKELIHOODS, Likelihood, Normal
from fusionvae.model.latent_group import LatentGroup, legacy_key_map
from fusionvae.model.layers import conv, normalise_together, weight_norm_groups
from fusionvae.model.network_config import NetworkConfig


def groups_per_scale(num_scales: int, num_groups: int, ada_groups: bool, min_groups: int = 1) -> list[int]:
    """Groups per latent scale, highest resolution first; ``ada_groups`` halves them per scale."""
    groups, n = [], num_groups
    for _ in range(num_scales):
        groups.append(n)
        if ada_groups:
            n = max(min_groups, n // 2)
    return groups


@dataclass
class FusionOutput:
    likelihood: Likelihood  # over the (uncropped) image
    kl: torch.Tensor  # [B, L] analytic KL(q || p) per group (zeros when sampling or deterministic)
    log_q: torch.Tensor  # [B] log q(z | x, y) of the drawn z
    log_p: torch.Tensor  # [B] log p(z | x) of the drawn z
    priors: list[Normal]  # p(z_l | z_<l, x) of every group, top first

    @property
    def prior_sigma(self) -> torch.Tensor:
        """``[B]`` mean sigma of the prior over all latent dimensions (each group weighted by its
        size); computed on request, so training pays nothing for it."""
        total = sum(p.sigma.flatten(1).sum(1) for p in self.priors)
        return total / sum(p.sigma[0].numel() for p in self.priors)


class FusionVAE(nn.Module):
    def __init__(self, config: NetworkConfig | None = None, **settings):
        """The network of ``config``, or of ``NetworkConfig(**settings)`` (the keyword form tests and
        scripts use); both: ``settings`` replace fields of ``config``."""
        super().__init__()
        c = replace(config, **settings) if config is not None else NetworkConfig(**settings)
        self.config = c
        self.aggregation, self.aggregation_level = c.aggregation, c.aggregation_level
        self.channels, self.skip, self.z_ch = c.channels, c.skip, c.num_latent_per_group
        self.res_dist, self.stochastic, self.activation_checkpointing = (
            c.res_dist,
            c.stochastic,
            c.activation_checkpointing,
        )
        self.likelihood_cls, self.num_mix = LIKELIHOODS[c.likelihood], c.num_mix
        self.groups = groups_per_scale(
            c.num_latent_scales, c.num_groups_per_scale, c.ada_groups, c.min_groups_per_scale
        )
        ch = self._build_encoder(
            c.num_channels, c.num_preprocess_blocks, c.num_preprocess_cells, c.num_cell_per_cond_enc, c.use_se
        )
        top = c.image_size // 2 ** (c.num_preprocess_blocks + c.num_latent_scales - 1)
        self.top_state = nn.Parameter(torch.randn(1, ch, top, top))
        ch = self._build_decoder(ch, c.num_cell_per_cond_dec, c.dec_expand, c.use_se)
        self._build_postprocess(ch, c.num_postprocess_blocks, c.num_postprocess_cells, c.post_expand, c.use_se)
        # NHWC: 1.4x faster training on CPU (depthwise conv backward) and the fast path for cuDNN
        self.memory_format = torch.channels_last if c.channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)
        self.register_load_state_dict_pre_hook(legacy_key_map)
        self._wn_groups = weight_norm_groups(self)  # plain list: the convs stay submodules of their cells

    @property
    def groups_decoder_order(self) -> list[int]:
        """Groups per scale, coarsest scale (the top of the decoder) first."""
        return self.groups[::-1]

    # ---- construction -------------------------------------------------------------------------
    def _build_encoder(self, ch: int, blocks: int, cells_per_block: int, cells_per_group: int, use_se: bool) -> int:
        """Stem, pre-process cells, one encoder tower stage per scale and enc0; returns the channels."""
        self.stem = conv(self.channels, ch, 3)
        pre = []
        for _ in range(blocks):
            for c in range(cells_per_block):
                down = c == cells_per_block - 1
                pre.append(encoder_cell(ch, down=down, use_se=use_se))
                ch = 2 * ch if down else ch
        self.preprocess = nn.Sequential(*pre)
        self.enc_groups, self.enc_down = nn.ModuleList(), nn.ModuleList()
        for scale, n in enumerate(self.groups):
            self.enc_groups.append(
                nn.ModuleList(
                    nn.Sequential(*[encoder_cell(ch, use_se=use_se) for _ in range(cells_per_group)]) for _ in range(n)
                )
            )
            if scale < len(self.groups) - 1:
                self.enc_down.append(encoder_cell(ch, down=True, use_se=use_se))
                ch *= 2
        self.enc0 = nn.Sequential(nn.ELU(), conv(ch, ch, 1), nn.ELU())
        return ch

    def _build_decoder(self, ch: int, cells_per_group: int, expand: int, use_se: bool) -> int:
        """One ``LatentGroup`` per latent group, coarsest scale first; returns the output channels."""
        groups = []
        for scale, n in enumerate(self.groups_decoder_order):
            if scale > 0:
                ch //= 2
            for g in range(n):
                cells = [decoder_cell(2 * ch, up=True, expand=expand, use_se=use_se)] if scale > 0 and g == 0 else []
                if scale > 0 or g > 0:
                    cells += [decoder_cell(ch, expand=expand, use_se=use_se) for _ in range(cells_per_group)]
                top = scale == 0 and g == 0  # its K = 0 prior is N(0, I)
                fusion = (self.aggregation, self.aggregation_level, self.res_dist)
                groups.append(LatentGroup(nn.Sequential(*cells), ch, self.z_ch, top, *fusion))
        self.latent_groups = nn.ModuleList(groups)
        return ch

    def _build_postprocess(self, ch: int, blocks: int, cells_per_block: int, expand: int, use_se: bool) -> None:
        post = []
        for _ in range(blocks):
            for c in range(cells_per_block):
                up = c == 0
                post.append(decoder_cell(ch, up=up, expand=expand, use_se=use_se))
                ch = ch // 2 if up else ch
        self.postprocess = nn.Sequential(*post)
        self.image_head = nn.Sequential(
            nn.ELU(), conv(ch, self.likelihood_cls.num_params(self.channels, self.num_mix), 3)
        )

    # ---- forward ------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.latent_groups)

    def _cell(self, cell: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return checkpointing.run(cell, x, self.activation_checkpointing and self.training)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-group features of ``images [N, C, H, W]`` in [0, 1], in decoder order (top first)."""
        h = self.stem(2 * images.contiguous(memory_format=self.memory_format) - 1)
        for cell in self.preprocess:
            h = self._cell(cell, h)
        feats = []
        for scale, groups in enumerate(self.enc_groups):
            for group in groups:
                h = self._cell(group, h)
                feats.append(h)
            if scale < len(self.enc_down):
                h = self._cell(self.enc_down[scale], h)
        feats[-1] = self.enc0(h)
        return feats[::-1]

    def forward(
        self,
        views: torch.Tensor,
        target: torch.Tensor | None = None,
        t: float = 1.0,
        repeats: int = 1,
    ) -> FusionOutput:
        """``views [B, K, C, H, W]`` (K may be 0), optional ``target [B, C, H, W]``.

        With a target, z is drawn from the posterior (training / likelihood); without, from the
        prior p(z | x) at temperature ``t`` (t = 0: the means). ``repeats`` draws that many z per
        item from one encoder pass (outputs ordered item-major, ``[B * repeats, ...]``).
        """
        normalise_together(self._wn_groups)  # all weights at once, a few ops per weight shape
        b, k = views.shape[:2]
        images = views if target is None else torch.cat([views, target.unsqueeze(1)], dim=1)
        slots = images.shape[1]
        feats = self.encode(images.flatten(0, 1)) if slots > 0 else [None] * self.num_groups
        n = b * repeats
        s = self.top_state.expand(n, -1, -1, -1)
        stats = _LatentStats(n, s.device)
        draw = "mean" if not self.stochastic else "posterior" if target is not None else "prior"
        for group, feat in zip(self.latent_groups, feats):
            slot_feats = None if feat is None else feat.view(b, slots, *feat.shape[1:]).repeat_interleave(repeats, 0)
            s = group(s, slot_feats, k, draw, t, stats, self._cell)
            if self.skip != "none" and slot_feats is not None and k > 0:
                s = self._add_skips(s, slot_feats[:, :k])
        for cell in self.postprocess:
            s = self._cell(cell, s)
        out = self.image_head(s)
        likelihood = self.likelihood_cls(out, self.channels, self.num_mix)
        return FusionOutput(likelihood, torch.stack(stats.kl, dim=1), stats.log_q, stats.log_p, stats.priors)

    def _add_skips(self, s: torch.Tensor, skips: torch.Tensor) -> torch.Tensor:
        """The decoder state with the K views' encoder features ``skips [n, K, ch, h, w]`` fused in."""
        mode, _, add = self.skip.partition("_")
        if add:
            return s + pool_features(skips, mode)
        return pool_features(torch.cat([s.unsqueeze(1), skips], dim=1), mode)


class _LatentStats:
    """Per-item sums that the latent groups add to: KL per group, log q(z) and log p(z); and the
    priors."""

    def __init__(self, n: int, device: torch.device):
        self.kl: list[torch.Tensor] = []
        self.log_q = torch.zeros(n, device=device)
        self.log_p = torch.zeros(n, device=device)
        self.priors: list[Normal] = []
