import math

import pytest
import torch

from fusionvae.model.aggregation import AGGREGATIONS, aggregate_params, check_aggregation, pool_features
from fusionvae.model.distributions import Normal


def raw(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Head outputs ``[B, K, 2Z, ...]`` whose effective parameters are ``mu`` and ``sigma``
    (inverts mu = 5 tanh(m / 5), sigma = exp(5 tanh(l / 5)) + 0.01), in float64."""
    mu, sigma = mu.double(), sigma.double()
    return torch.cat([5 * torch.atanh(mu / 5), 5 * torch.atanh((sigma - 0.01).log() / 5)], dim=2)


def aggregate(mu: torch.Tensor, sigma: torch.Tensor, mode: str) -> Normal:
    """Aggregate views given by their effective parameters (the network passes head outputs)."""
    out = aggregate_params(raw(mu, sigma), mode)
    return Normal(out.mu.float(), out.sigma.float())


@pytest.mark.parametrize("mode", ["max", "mean", "bayes"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_permutation_invariant_for_any_k(mode, k):
    torch.manual_seed(k)
    mu, sigma = torch.randn(4, k, 2, 3, 3), torch.rand(4, k, 2, 3, 3) + 0.05
    ref = aggregate(mu, sigma, mode)
    for _ in range(3):
        perm = torch.randperm(k)
        out = aggregate(mu[:, perm], sigma[:, perm], mode)
        torch.testing.assert_close(out.mu, ref.mu)
        torch.testing.assert_close(out.sigma, ref.sigma)
    assert ref.mu.shape == ref.sigma.shape == (4, 2, 3, 3)
    assert (ref.sigma > 0).all()


def test_skip_features_fuse_by_max_or_mean():
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0]]).view(1, 2, 2, 1, 1)
    assert pool_features(x, "max").flatten().tolist() == [3.0, 4.0]
    assert pool_features(x, "mean").flatten().tolist() == [2.0, 1.0]


def test_the_registry_is_what_the_config_accepts():
    assert list(AGGREGATIONS) == ["max", "mean", "bayes", "bayes_official"]
    assert check_aggregation("bayes") == "bayes"


@pytest.mark.parametrize("mode", ["max", "mean", "bayes"])
def test_single_view_is_identity(mode):
    mu, sigma = torch.randn(2, 1, 5), torch.rand(2, 1, 5) + 0.1
    out = aggregate(mu, sigma, mode)
    torch.testing.assert_close(out.mu, mu[:, 0])
    torch.testing.assert_close(out.sigma, sigma[:, 0])


def test_values():
    mu = torch.tensor([[[1.0], [3.0]]])
    sigma = torch.tensor([[[1.0], [2.0]]])
    assert aggregate(mu, sigma, "max").mu.item() == 3.0 and aggregate(mu, sigma, "max").sigma.item() == 2.0
    assert aggregate(mu, sigma, "mean").mu.item() == 2.0
    assert aggregate(mu, sigma, "mean").sigma.item() == pytest.approx(2**0.5)
    # product of N(1, 1) and N(3, 4): precision 1.25, mean (1 + 3/4) / 1.25 = 1.4
    bayes = aggregate(mu, sigma, "bayes")
    assert bayes.mu.item() == pytest.approx(1.4) and bayes.sigma.item() == pytest.approx(1.25**-0.5)


def test_bayes_sharpens_with_more_views():
    sigma = torch.full((1, 3, 1), 0.5)
    widths = [aggregate(torch.zeros(1, k, 1), sigma[:, :k], "bayes").sigma.item() for k in (1, 2, 3)]
    assert widths[0] > widths[1] > widths[2]


def test_unknown_aggregation_is_rejected():
    with pytest.raises(ValueError, match="unknown aggregation 'median'.*max, mean, bayes, bayes_official"):
        check_aggregation("median")


def test_bayes_official_is_the_sequential_update_on_raw_outputs():
    # raw heads: view 1 (mu 1, log var 0), view 2 (mu 3, log var log 4): gain 1/5, m = 1.4, v = 0.8
    params = torch.tensor([[[1.0, 0.0], [3.0, math.log(4.0)]]]).view(1, 2, 2, 1)
    out = aggregate_params(params, "bayes_official")
    expected = Normal.from_params(torch.tensor([[1.4], [math.log(0.8)]]).view(1, 2, 1))
    torch.testing.assert_close(out.mu, expected.mu)
    torch.testing.assert_close(out.sigma, expected.sigma)
    assert out.sigma.item() == pytest.approx(math.exp(5 * math.tanh(math.log(0.8) / 5)) + 0.01)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_bayes_official_equals_the_product_with_variance_exp_log_sigma(k):
    torch.manual_seed(10 + k)
    params = torch.randn(3, k, 4, 2, 2)
    mu, log_var = params.chunk(2, dim=2)
    precision = (-log_var).exp()
    total = precision.sum(1)
    closed = Normal.from_params(torch.cat([(mu * precision).sum(1) / total, -total.log()], dim=1))
    out = aggregate_params(params, "bayes_official")
    torch.testing.assert_close(out.mu, closed.mu)
    torch.testing.assert_close(out.sigma, closed.sigma)
    perm = aggregate_params(params[:, torch.randperm(k)], "bayes_official")
    torch.testing.assert_close(perm.mu, out.mu)
    torch.testing.assert_close(perm.sigma, out.sigma)


def test_bayes_official_is_more_confident_than_the_product():
    """K equal views of std s: the product gives s / sqrt(K); the official update about s / K."""
    raw = torch.zeros(1, 3, 2, 1)  # mu 0, log sigma 0 -> effective std exp(0) + 0.01 per view
    fused = [aggregate_params(raw[:, :k], m).sigma.item() for m in ("bayes", "bayes_official") for k in (3,)]
    assert fused[0] == pytest.approx(1.01 / math.sqrt(3), rel=1e-5)
    assert fused[1] == pytest.approx(math.exp(5 * math.tanh(math.log(1 / 3) / 5)) + 0.01, rel=1e-5)
    assert fused[1] < fused[0]


@pytest.mark.parametrize("mode", ["max", "mean", "bayes"])
def test_aggregation_applies_the_parameterisation_first(mode):
    params = torch.randn(2, 3, 6, 2, 2) * 4
    mu, sigma = Normal.from_params(params, dim=2).params()
    torch.testing.assert_close(aggregate_params(params, mode).mu, aggregate(mu, sigma, mode).mu, atol=1e-5, rtol=1e-5)


def test_bayes_official_with_several_latent_channels():
    # [B, K, 2Z] with Z = 3: channels 0..2 are the means, 3..5 the log variances
    params = torch.tensor([[[1.0, 2.0, -1.0, 0.0, 0.0, math.log(4.0)], [3.0, 2.0, 1.0, math.log(4.0), 0.0, 0.0]]])
    out = aggregate_params(params, "bayes_official")
    # per channel: gains 1/5, 1/2, 4/5 -> m = (1.4, 2, 0.6), v = (0.8, 0.5, 0.8)
    expected = Normal.from_params(torch.tensor([[1.4, 2.0, 0.6, math.log(0.8), math.log(0.5), math.log(0.8)]]))
    assert out.mu.shape == (1, 3)
    torch.testing.assert_close(out.mu, expected.mu)
    torch.testing.assert_close(out.sigma, expected.sigma)


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_pool_features_values(mode):
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0], [-1.0, 0.5]]).view(1, 3, 2, 1, 1)  # [B, K=3, C=2, 1, 1]
    out = pool_features(x, mode)
    expected = {"max": [3.0, 4.0], "mean": [1.0, 2.5 / 3]}[mode]
    assert out.shape == (1, 2, 1, 1)
    torch.testing.assert_close(out.view(-1), torch.tensor(expected))
