"""Where the views meet (model.aggregation_level) and the skip modes, checked on what each part of a
latent group and of the decoder actually receives; the fusion diagnostic's values."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY as TINY_OVERRIDES
from conftest import compose_cfg

from fusionvae.model.aggregation import aggregate_params
from fusionvae.model.distributions import Normal
from fusionvae.model.network import FusionVAE
from fusionvae.training.module import FusionVAEModule
from tests.test_network import TINY, data, tiny


def group_inputs(net: FusionVAE, k: int):
    """A non-top latent group of ``net``, a decoder state and slot features [n, k + 1, ch, h, w]."""
    group = net.latent_groups[1]
    ch = group.enc_proj.out_channels
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, ch, 4, 4, generator=g)
    feats = torch.randn(2, k + 1, ch, 4, 4, generator=g)
    return group, s, feats


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_features_level_pools_the_view_features_then_applies_the_head_once(mode):
    net = tiny(aggregation=mode, aggregation_level="features").eval()
    group, s, feats = group_inputs(net, 3)
    with torch.no_grad():
        views, target = group.head_outputs(s, feats, 3)
        f = feats + group.enc_proj(s).unsqueeze(1)
        pooled = f[:, :3].amax(1) if mode == "max" else f[:, :3].mean(1)
        torch.testing.assert_close(views[:, 0], group.head(pooled))
        torch.testing.assert_close(target, group.head(f[:, 3]))  # the posterior: the head on the target
        prior = group.prior(s, views)
        expected = Normal.from_params(group.head(pooled))
    assert views.shape[1] == 1
    torch.testing.assert_close(prior.mu, expected.mu)
    torch.testing.assert_close(prior.sigma, expected.sigma)


def test_params_level_fuses_the_per_view_normals():
    net = tiny(aggregation="max", aggregation_level="params").eval()
    group, s, feats = group_inputs(net, 3)
    with torch.no_grad():
        views, target = group.head_outputs(s, feats, 3)
        f = feats + group.enc_proj(s).unsqueeze(1)
        per_view = torch.stack([group.head(f[:, i]) for i in range(3)], dim=1)
        torch.testing.assert_close(views, per_view)
        torch.testing.assert_close(target, group.head(f[:, 3]))
        prior = group.prior(s, views)
    fused = aggregate_params(per_view, "max")
    torch.testing.assert_close(prior.sigma, fused.sigma)
    # max of the sigmas: an added view can only keep or widen them at this level
    assert (prior.sigma >= Normal.from_params(per_view[:, 0]).sigma - 1e-6).all()


def test_one_view_is_the_same_at_both_levels_and_more_are_not():
    views, target = data()
    outs = {}
    for level in ("features", "params"):
        net = tiny(aggregation_level=level).eval()
        for k in (1, 3):
            torch.manual_seed(5)
            with torch.no_grad():
                outs[level, k] = net(views[:, :k], target).kl
    torch.testing.assert_close(outs["features", 1], outs["params", 1])
    assert not torch.allclose(outs["features", 3], outs["params", 3])


def test_features_level_is_permutation_invariant():
    net = tiny(aggregation="max", aggregation_level="features").eval()
    views, target = data()
    kls = []
    for order in ([0, 1, 2], [2, 0, 1]):
        torch.manual_seed(5)
        with torch.no_grad():
            kls.append(net(views[:, order], target).kl)
    torch.testing.assert_close(kls[0], kls[1])


@pytest.mark.parametrize("aggregation", ["bayes", "bayes_official"])
def test_distribution_aggregations_are_refused_at_the_features_level(aggregation):
    with pytest.raises(ValueError, match=rf"model.aggregation={aggregation} combines distributions.*"
                                         r"use model.aggregation_level=params"):  # fmt: skip
        FusionVAE(**TINY, aggregation=aggregation, aggregation_level="features")
    with pytest.raises(ValueError, match="unknown aggregation level 'both'"):
        FusionVAE(**TINY, aggregation_level="both")
    FusionVAE(**TINY, aggregation=aggregation, aggregation_level="params")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("max", [5.0, 1.0]), ("mean", [8 / 3, -1 / 3]), ("max_add", [6.0, 1.0]), ("mean_add", [4.5, -0.5])],
)
def test_skip_modes_pool_with_or_add_to_the_decoder_state(mode, expected):
    net = tiny(skip=mode)
    s = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)  # the decoder state, two channels
    skips = torch.tensor([[5.0, -2.0], [2.0, 1.0]]).view(1, 2, 2, 1, 1)  # K = 2 views
    assert net._add_skips(s, skips).flatten().tolist() == pytest.approx(expected)


def test_prior_sigma_is_the_size_weighted_mean_over_groups():
    net = tiny().eval()
    views, target = data()
    with torch.no_grad():
        out = net(views[:, :2], target)
    sums = sum(p.sigma.flatten(1).sum(1) for p in out.priors)
    sizes = sum(p.sigma[0].numel() for p in out.priors)
    torch.testing.assert_close(out.prior_sigma, sums / sizes)
    cvae = tiny(num_latent_scales=1, num_groups_per_scale=1).eval()
    with torch.no_grad():  # one group, no views: the prior is N(0, I)
        assert cvae(views[:, :0], target).prior_sigma.tolist() == [1.0, 1.0, 1.0]


def test_validation_logs_the_fusion_diagnostic_per_k():
    module = FusionVAEModule(**TINY, k_max=3).eval()
    logged = {}
    module.log_dict = lambda metrics, **kw: logged.update({k: float(v) for k, v in metrics.items()})
    module.log = lambda name, value, **kw: logged.update({name: float(value)})
    batch = torch.rand(3, 4, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    with torch.no_grad():
        module.validation_step(batch, 0)
    for k in range(4):
        torch.manual_seed(0)  # the draws of K = 0 .. k - 1 come first
        with torch.no_grad():
            for j in range(k + 1):
                terms = module.terms(batch, j, prior_sigma=True)
        assert logged[f"val/kl_k{k}"] == pytest.approx(terms.kl.sum(1).mean().item(), rel=1e-5)
        assert logged[f"val/prior_sigma_k{k}"] == pytest.approx(terms.prior_sigma.mean().item(), rel=1e-5)
        assert logged[f"val/nelbo_k{k}"] == pytest.approx(terms.nelbo.mean().item(), rel=1e-5)


def test_configs_default_to_features_and_the_skip_baselines_to_max():
    assert compose_cfg("train", TINY_OVERRIDES).model.aggregation_level == "features"
    assert compose_cfg("train", [*TINY_OVERRIDES, "model=cvae_skip"]).model.skip == "max"
    module = FusionVAEModule(**TINY)  # built in Python: the level is recorded all the same
    assert module.hparams.aggregation_level == "features"
