"""FusionVAE: NVAE-style hierarchical conditional VAE fusing K views into samples of the target.

The bottom-up encoder runs on all views and the target at once (folded into the batch, shared
weights). At every latent group a shared head maps ``e_k + Conv1x1(s)`` (s = decoder state) to
per-slot Normal parameters: the prior aggregates the K views, the posterior uses the target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .aggregation import aggregate_features, aggregate_params, check_aggregation
from .cells import decoder_cell, encoder_cell
from .distributions import LIKELIHOODS, Normal, soft_clamp
from .layers import conv

SKIP_MODES = ("none", "max", "mean")


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
    likelihood: object  # DiscMixLogistic | Bernoulli over the (uncropped) image
    kl: torch.Tensor  # [B, L] analytic KL(q || p) per group (zeros when sampling or deterministic)
    log_q: torch.Tensor  # [B] log q(z | x, y) of the drawn z
    log_p: torch.Tensor  # [B] log p(z | x) of the drawn z


class FusionVAE(nn.Module):
    def __init__(
        self,
        channels: int = 1,
        image_size: int = 32,
        num_channels: int = 8,
        num_preprocess_blocks: int = 2,
        num_preprocess_cells: int = 1,
        num_postprocess_blocks: int = 2,
        num_postprocess_cells: int = 1,
        num_latent_scales: int = 2,
        num_groups_per_scale: int = 5,
        ada_groups: bool = True,
        min_groups_per_scale: int = 1,
        num_latent_per_group: int = 10,
        num_cell_per_cond_enc: int = 1,
        num_cell_per_cond_dec: int = 1,
        use_se: bool = True,
        dec_expand: int = 6,
        post_expand: int = 3,
        aggregation: str = "max",
        skip: str = "none",
        res_dist: bool = False,
        stochastic: bool = True,
        likelihood: str = "logistic_mixture",
        num_mix: int = 10,
        channels_last: bool = True,
    ):
        super().__init__()
        self.aggregation = check_aggregation(aggregation)
        if skip not in SKIP_MODES:
            raise ValueError(f"unknown skip mode '{skip}'; choose one of {', '.join(SKIP_MODES)} (model.net.skip)")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood '{likelihood}'; choose one of {', '.join(LIKELIHOODS)}")
        for name, value in [("num_channels", num_channels), ("num_latent_scales", num_latent_scales),
                            ("num_groups_per_scale", num_groups_per_scale), ("num_latent_per_group", num_latent_per_group),
                            ("num_preprocess_cells", num_preprocess_cells), ("num_postprocess_cells", num_postprocess_cells)]:
            if value < 1:
                raise ValueError(f"model.net.{name} must be >= 1, got {value}")
        factor = 2 ** (num_preprocess_blocks + num_latent_scales - 1)
        if image_size % factor or num_postprocess_blocks != num_preprocess_blocks:
            raise ValueError(
                f"image_size {image_size} must be divisible by 2^(num_preprocess_blocks + num_latent_scales - 1) = {factor} "
                f"and num_postprocess_blocks ({num_postprocess_blocks}) must equal num_preprocess_blocks ({num_preprocess_blocks})"
            )
        self.channels, self.skip, self.res_dist, self.stochastic = channels, skip, res_dist, stochastic
        self.z_ch = num_latent_per_group
        self.likelihood_cls, self.num_mix = LIKELIHOODS[likelihood], num_mix
        self.groups = groups_per_scale(num_latent_scales, num_groups_per_scale, ada_groups, min_groups_per_scale)
        self.groups_decoder_order = self.groups[::-1]

        # Bottom-up encoder (highest resolution first).
        ch = num_channels
        self.stem = conv(channels, ch, 3)
        pre = []
        for _ in range(num_preprocess_blocks):
            for c in range(num_preprocess_cells):
                down = c == num_preprocess_cells - 1
                pre.append(encoder_cell(ch, down=down, use_se=use_se))
                ch = 2 * ch if down else ch
        self.preprocess = nn.Sequential(*pre)
        self.enc_groups = nn.ModuleList()
        self.enc_down = nn.ModuleList()
        for s, n in enumerate(self.groups):
            self.enc_groups.append(nn.ModuleList(
                nn.Sequential(*[encoder_cell(ch, use_se=use_se) for _ in range(num_cell_per_cond_enc)]) for _ in range(n)
            ))
            if s < num_latent_scales - 1:
                self.enc_down.append(encoder_cell(ch, down=True, use_se=use_se))
                ch *= 2
        self.enc0 = nn.Sequential(nn.ELU(), conv(ch, ch, 1), nn.ELU())

        # Top-down decoder (lowest resolution first).
        top = image_size // factor
        self.top_state = nn.Parameter(torch.randn(1, ch, top, top))
        self.dec_cells, self.enc_proj, self.heads, self.prior_heads, self.combiners = (nn.ModuleList() for _ in range(5))
        z = num_latent_per_group
        for s, n in enumerate(self.groups_decoder_order):
            for g in range(n):
                cells = []
                if s > 0 and g == 0:
                    cells.append(decoder_cell(2 * ch, up=True, expand=dec_expand, use_se=use_se))
                if s > 0 or g > 0:
                    cells += [decoder_cell(ch, expand=dec_expand, use_se=use_se) for _ in range(num_cell_per_cond_dec)]
                self.dec_cells.append(nn.Sequential(*cells))
                self.enc_proj.append(conv(ch, ch, 1))
                self.heads.append(conv(ch, 2 * z, 3))
                top_group = s == 0 and g == 0  # its K = 0 prior is N(0, I)
                self.prior_heads.append(nn.Identity() if top_group else nn.Sequential(nn.ELU(), conv(ch, 2 * z, 1)))
                self.combiners.append(conv(ch + z, ch, 1))
            ch //= 2
        ch *= 2
        post = []
        for _ in range(num_postprocess_blocks):
            for c in range(num_postprocess_cells):
                up = c == 0
                post.append(decoder_cell(ch, up=up, expand=post_expand, use_se=use_se))
                ch = ch // 2 if up else ch
        self.postprocess = nn.Sequential(*post)
        self.image_head = nn.Sequential(nn.ELU(), conv(ch, self.likelihood_cls.num_params(channels, num_mix), 3))
        # NHWC: 1.4x faster training on CPU (depthwise conv backward) and the fast path for cuDNN
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    @property
    def num_groups(self) -> int:
        return len(self.heads)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-group features of ``images [N, C, H, W]`` in [0, 1], in decoder order (top first)."""
        h = self.preprocess(self.stem(2 * images.contiguous(memory_format=self.memory_format) - 1))
        feats = []
        for s, groups in enumerate(self.enc_groups):
            for group in groups:
                h = group(h)
                feats.append(h)
            if s < len(self.enc_down):
                h = self.enc_down[s](h)
        feats[-1] = self.enc0(h)
        return feats[::-1]

    def _prior(self, l: int, s: torch.Tensor, view_params: torch.Tensor | None) -> Normal:
        if view_params is not None and view_params.shape[1] > 0:
            return aggregate_params(view_params, self.aggregation)
        if l == 0:  # unconditional top prior
            return Normal.standard((s.shape[0], self.z_ch, *s.shape[2:]), s.device)
        return Normal.from_params(self.prior_heads[l](s))

    def _posterior(self, params: torch.Tensor, prior: Normal) -> Normal:
        if not self.res_dist:
            return Normal.from_params(params)
        d_mu, d_log_sigma = params.float().chunk(2, dim=1)
        return Normal(prior.mu + soft_clamp(d_mu), prior.sigma * soft_clamp(d_log_sigma).exp())

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
        b, k = views.shape[:2]
        images = views if target is None else torch.cat([views, target.unsqueeze(1)], dim=1)
        slots = images.shape[1]
        feats = self.encode(images.flatten(0, 1)) if slots > 0 else [None] * self.num_groups
        n = b * repeats
        s = self.top_state.expand(n, -1, -1, -1)
        kls, log_q, log_p = [], s.new_zeros(n, dtype=torch.float32), s.new_zeros(n, dtype=torch.float32)
        for l, feat in enumerate(feats):
            s = self.dec_cells[l](s)
            slot_feats = None
            if feat is not None:
                slot_feats = feat.view(b, slots, *feat.shape[1:]).repeat_interleave(repeats, dim=0)
                f = slot_feats + self.enc_proj[l](s).unsqueeze(1)
                params = self.heads[l](f.flatten(0, 1)).view(n, slots, 2 * self.z_ch, *f.shape[3:])
            prior = self._prior(l, s, params[:, :k] if feat is not None else None)
            if not self.stochastic:
                z = prior.mu
                kls.append(log_q.new_zeros(n))
            elif target is not None:
                q = self._posterior(params[:, k], prior)
                z = q.sample(t)
                kls.append(q.kl(prior).flatten(1).sum(1))
                log_q = log_q + q.log_prob(z).flatten(1).sum(1)
                log_p = log_p + prior.log_prob(z).flatten(1).sum(1)
            else:
                z = prior.sample(t)
                kls.append(log_q.new_zeros(n))
                log_p = log_p + prior.log_prob(z).flatten(1).sum(1)
            s = self.combiners[l](torch.cat([s, z.to(s.dtype)], dim=1))
            if self.skip != "none" and slot_feats is not None and k > 0:
                s = s + aggregate_features(slot_feats[:, :k], self.skip)
        out = self.image_head(self.postprocess(s))
        return FusionOutput(self.likelihood_cls(out, self.channels, self.num_mix), torch.stack(kls, dim=1), log_q, log_p)
