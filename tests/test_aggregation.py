import pytest
import torch

from fusionvae.aggregation import aggregate, aggregate_features, check_aggregation


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


@pytest.mark.parametrize("mode", ["max", "mean", "bayes"])
def test_k_zero_returns_none(mode):
    assert aggregate(torch.zeros(2, 0, 3), torch.ones(2, 0, 3), mode) is None
    assert aggregate_features(torch.zeros(2, 0, 3, 4, 4), "max") is None


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
    with pytest.raises(ValueError, match="unknown aggregation 'median'.*max, mean, bayes"):
        check_aggregation("median")
