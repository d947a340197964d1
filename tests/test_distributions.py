import math

import pytest
import torch

from fusionvae.distributions import LIKELIHOODS, Bernoulli, DiscMixLogistic, Likelihood, Normal


def all_grey_values(shape=(2, 3)):
    return (torch.arange(256).float() / 255).view(256, 1, 1, 1).expand(256, 1, *shape)


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_grey_mixture_sums_to_one_over_all_pixel_values(scale):
    torch.manual_seed(0)
    params = torch.randn(1, DiscMixLogistic.num_params(1), 2, 3) * scale
    dist = DiscMixLogistic(params.expand(256, -1, -1, -1), channels=1)
    total = torch.logsumexp(dist.log_prob(all_grey_values()), dim=0).exp()
    torch.testing.assert_close(total, torch.ones(2, 3), atol=1e-4, rtol=0)


def test_rgb_mixture_with_channel_coupling_sums_to_one():
    torch.manual_seed(1)
    params = torch.randn(1, DiscMixLogistic.num_params(3, num_mix=2), 1, 1)
    g, b = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    dist = DiscMixLogistic(params.expand(256 * 256, -1, -1, -1), channels=3, num_mix=2)
    total = 0.0
    for r in range(0, 256):
        x = torch.stack([torch.full_like(g, r), g, b], dim=-1).view(-1, 3, 1, 1).float() / 255
        total += dist.log_prob(x).exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-3)


def test_mixture_edge_bins_use_integer_values():
    # A logistic centred far below 0 puts almost all mass into bin 0.
    params = torch.zeros(1, DiscMixLogistic.num_params(1), 1, 1)
    params[:, 0] = 20.0  # mixture logits [0:10]: pick component 0
    params[:, 10] = -5.0  # means [10:20] (image scale [-1, 1])
    params[:, 20] = -5.0  # log scales [20:30]
    dist = DiscMixLogistic(params, channels=1)
    lp0 = dist.log_prob(torch.full((1, 1, 1, 1), 0.4 / 255))  # rounds to bin 0
    assert lp0.exp().item() == pytest.approx(1.0, abs=1e-3)
    lp1 = dist.log_prob(torch.full((1, 1, 1, 1), 0.6 / 255))  # rounds to bin 1: no mass
    assert lp1.exp().item() < 1e-3


def test_mixture_sample_and_mean_in_range():
    torch.manual_seed(2)
    dist = DiscMixLogistic(torch.randn(4, DiscMixLogistic.num_params(3), 5, 5), channels=3)
    s, m = dist.sample(), dist.mean()
    assert s.shape == m.shape == (4, 3, 5, 5)
    assert s.min() >= 0 and s.max() <= 1 and m.min() >= 0 and m.max() <= 1
    torch.testing.assert_close(s * 255, torch.round(s * 255))


def test_mixture_sample_follows_the_distribution():
    torch.manual_seed(3)
    params = torch.randn(1, DiscMixLogistic.num_params(1), 1, 1)
    n = 20000
    samples = DiscMixLogistic(params.expand(n, -1, -1, -1), channels=1).sample().view(-1)
    probs = DiscMixLogistic(params.expand(256, -1, -1, -1), channels=1).log_prob(all_grey_values((1, 1))).exp().view(-1)
    expected_mean = (probs * torch.arange(256) / 255).sum()
    assert samples.mean().item() == pytest.approx(expected_mean.item(), abs=0.01)


def test_normal_kl_matches_monte_carlo():
    torch.manual_seed(0)
    q = Normal(torch.randn(8), torch.rand(8) + 0.2)
    p = Normal(torch.randn(8), torch.rand(8) + 0.5)
    z = q.mu + q.sigma * torch.randn(200_000, 8)
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(q.kl(p), mc, atol=0.02, rtol=0.02)
    assert (q.kl(q).abs() < 1e-6).all()


def test_normal_log_prob_matches_torch():
    q = Normal(torch.tensor([0.3, -1.0]), torch.tensor([0.5, 2.0]))
    z = torch.tensor([1.0, 0.0])
    ref = torch.distributions.Normal(q.mu, q.sigma).log_prob(z)
    torch.testing.assert_close(q.log_prob(z), ref)


def test_normal_parameterisation_soft_clamps():
    params = torch.tensor([[1000.0, -1000.0]]).view(1, 2, 1, 1)
    n = Normal.from_params(params)
    assert n.mu.item() == pytest.approx(5.0, abs=1e-4)
    assert n.sigma.item() == pytest.approx(math.exp(-5.0) + 0.01, rel=1e-4)
    n0 = Normal.from_params(torch.zeros(1, 2, 1, 1))
    assert n0.sigma.item() == pytest.approx(1.01)
    torch.manual_seed(0)
    assert (n0.sample(t=0.0) == n0.mu).all()


def test_bernoulli_normalised():
    logits = torch.randn(1, 1, 3, 3)
    dist = Bernoulli(logits, 1)
    total = dist.log_prob(torch.zeros(1, 1, 3, 3)).exp() + dist.log_prob(torch.ones(1, 1, 3, 3)).exp()
    torch.testing.assert_close(total, torch.ones(1, 3, 3))


def test_every_likelihood_implements_the_interface():
    for name, cls in LIKELIHOODS.items():
        assert issubclass(cls, Likelihood), name
        dist = cls(torch.randn(2, cls.num_params(3, 2), 4, 4), 3, 2)
        x = torch.rand(2, 3, 4, 4)
        assert dist.log_prob(x).shape == (2, 4, 4)
        assert dist.sample().shape == dist.mean().shape == (2, 3, 4, 4)
