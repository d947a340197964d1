"""Every setting of the FusionVAE network, with its default, written once (``NetworkConfig``), its
checks, and what a checkpoint written before a setting existed needs (``legacy_overrides``)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from fusionvae.errors import BadInputError
from fusionvae.model.aggregation import check_aggregation, check_aggregation_level
from fusionvae.model.distributions import LIKELIHOODS

# encoder->decoder skips (baselines and the ablation only), named as in the official code:
# "max" / "mean" pool {s, skip_1..skip_K} element-wise (maxAg / meaAg, the official default is
# maxAg); "max_add" / "mean_add" add the pooled skips to s (maxAgAdd / meaAgAdd)
SKIP_MODES = ("none", "max", "mean", "max_add", "mean_add")


@dataclass(frozen=True)
class NetworkConfig:
    """Every network setting, with its default written once (the YAML's ``model.*`` keys map onto
    these fields; checkpoints store them all as hyperparameters; code reading a checkpoint builds
    one with ``from_hparams`` instead of guessing defaults)."""

    channels: int = 1
    image_size: int = 32
    num_channels: int = 8
    num_preprocess_blocks: int = 2
    num_preprocess_cells: int = 1
    num_postprocess_blocks: int = 2
    num_postprocess_cells: int = 1
    num_latent_scales: int = 2
    num_groups_per_scale: int = 5
    ada_groups: bool = True
    min_groups_per_scale: int = 1
    num_latent_per_group: int = 10
    num_cell_per_cond_enc: int = 1
    num_cell_per_cond_dec: int = 1
    use_se: bool = True
    dec_expand: int = 6
    post_expand: int = 3
    aggregation: str = "max"
    aggregation_level: str = "features"
    skip: str = "none"
    res_dist: bool = False
    stochastic: bool = True
    likelihood: str = "logistic_mixture"
    num_mix: int = 10
    channels_last: bool = True
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        _validate(
            self.image_size,
            self.skip,
            self.likelihood,
            self.num_preprocess_blocks,
            self.num_postprocess_blocks,
            self.num_latent_scales,
            num_channels=self.num_channels,
            num_latent_scales=self.num_latent_scales,
            num_groups_per_scale=self.num_groups_per_scale,
            num_latent_per_group=self.num_latent_per_group,
            num_preprocess_cells=self.num_preprocess_cells,
            num_postprocess_cells=self.num_postprocess_cells,
        )
        check_aggregation(self.aggregation)
        check_aggregation_level(self.aggregation_level, self.aggregation)

    @classmethod
    def from_hparams(cls, hparams) -> NetworkConfig:
        """The network of a checkpoint's hyperparameters (other keys, e.g. ``optim``, are not the
        network's), as it was trained: a key an older checkpoint lacks takes its default, or the
        value of ``legacy_overrides``."""
        values = {f.name: hparams[f.name] for f in fields(cls) if f.name in hparams}
        return cls(**{**values, **legacy_overrides(hparams)})


# skips of checkpoints written before aggregation_level existed, in today's names
_LEGACY_SKIP = {"max": "max_add", "mean": "mean_add"}


def legacy_overrides(hparams) -> dict:
    """Network settings to give a checkpoint written before they existed, so it loads, evaluates
    and resumes exactly as it was trained (``{}`` for a current checkpoint)."""
    if "aggregation_level" in hparams:
        return {}
    skip = hparams.get("skip", NetworkConfig.skip)
    return {"aggregation_level": "params", "skip": _LEGACY_SKIP.get(skip, skip)}


def _validate(
    image_size: int, skip: str, likelihood: str, pre_blocks: int, post_blocks: int, scales: int, **sizes: int
) -> None:
    """Reject impossible settings with the config key to change."""
    if skip not in SKIP_MODES:
        raise BadInputError(f"unknown skip mode '{skip}'; choose one of {', '.join(SKIP_MODES)} (model.skip)")
    if likelihood not in LIKELIHOODS:
        raise BadInputError(
            f"unknown likelihood '{likelihood}'; choose one of {', '.join(LIKELIHOODS)} (model.likelihood)"
        )
    for name, value in sizes.items():
        if value < 1:
            raise BadInputError(f"model.{name} must be >= 1, got {value}")
    factor = 2 ** (pre_blocks + scales - 1)
    if image_size % factor or post_blocks != pre_blocks:
        raise BadInputError(
            f"image_size {image_size} must be divisible by "
            f"2^(num_preprocess_blocks + num_latent_scales - 1) = {factor} "
            f"and num_postprocess_blocks ({post_blocks}) must equal num_preprocess_blocks ({pre_blocks}) (model.*)"
        )
