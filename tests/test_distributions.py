import math
import warnings

import pytest
import torch

from fusionvae.model.distributions import LIKELIHOODS, Bernoulli, DiscMixLogistic, Likelihood, Normal, _expected_level


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


def test_num_params_values():
    # PixelCNN++: per component 1 logit, C means, C log-scales and C(C-1)/2 coupling coefficients
    assert DiscMixLogistic.num_params(1) == 30
    assert DiscMixLogistic.num_params(3) == 100
    assert DiscMixLogistic.num_params(3, num_mix=2) == 20
    assert DiscMixLogistic.num_params(4, num_mix=1) == 15
    assert Bernoulli.num_params(3) == 3


def test_normal_standard_on_the_requested_device():
    n = Normal.standard((2, 3), torch.device("cpu"))
    assert torch.equal(n.mu, torch.zeros(2, 3)) and torch.equal(n.sigma, torch.ones(2, 3))
    meta = Normal.standard((4, 1), torch.device("meta"))
    assert meta.mu.device.type == meta.sigma.device.type == "meta"
    assert meta.mu.shape == meta.sigma.shape == (4, 1)


def test_normal_sample_moments_and_temperature():
    torch.manual_seed(0)
    n = Normal(torch.full((200_000,), 2.0), torch.full((200_000,), 0.5))
    z = n.sample()
    assert z.mean().item() == pytest.approx(2.0, abs=0.005) and z.std().item() == pytest.approx(0.5, abs=0.005)
    z = n.sample(t=0.5)  # the temperature scales the std
    assert z.mean().item() == pytest.approx(2.0, abs=0.005) and z.std().item() == pytest.approx(0.25, abs=0.003)


def test_mixture_log_prob_clamps_pixels_outside_unit_range():
    torch.manual_seed(4)
    dist = DiscMixLogistic(torch.randn(1, DiscMixLogistic.num_params(3, 2), 2, 2), channels=3, num_mix=2)
    x = torch.tensor([[-0.02, 1.03], [0.5, -1.0]]).expand(1, 3, 2, 2)  # e.g. float error of a resize
    assert torch.equal(dist.log_prob(x), dist.log_prob(x.clamp(0, 1)))


def test_mixture_log_scales_are_clamped_at_minus_seven():
    # narrow components 0.001 above the lower edge of bins 20 .. 240: about 0.75 of the mass in that bin
    means = ((torch.tensor([20.0, 60, 100, 140, 200, 240]) - 0.5) / 127.5 - 1 + 0.001).view(1, 1, 2, 3)

    def table(log_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        params = torch.cat([torch.zeros(1, 1, 2, 3), means, torch.full((1, 1, 2, 3), log_scale)], dim=1)
        dist = DiscMixLogistic(params.expand(256, -1, -1, -1), channels=1, num_mix=1)
        return dist.log_prob(all_grey_values()), dist.mean()[0]

    lp, mean = table(-10.0)
    lp7, mean7 = table(-7.0)
    assert torch.equal(lp, lp7) and torch.equal(mean, mean7)
    lp6, mean6 = table(-6.5)  # the values are sensitive to the scale there
    assert (lp6 - lp7).abs().max() > 0.1 and (mean6 - mean7).abs().min() > 0.05 / 255


def test_mixture_methods_warn_about_nothing():
    torch.manual_seed(5)
    dist = DiscMixLogistic(torch.randn(2, DiscMixLogistic.num_params(3), 4, 4), channels=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. an implicit softmax dimension
        dist.log_prob(torch.rand(2, 3, 4, 4))
        dist.mean()
        dist.sample()


def _expected_level_reference(mu: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """sum_v v * pmf(v) in float64, from the logistic CDF at the bin edges (v - 0.5) / 127.5 - 1."""
    edges = torch.arange(1, 256, dtype=torch.float64) / 127.5 - 1.0 - 1.0 / 255.0
    cdf = torch.sigmoid((edges - mu.unsqueeze(-1)) / log_scale.exp().unsqueeze(-1))
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf, torch.ones_like(cdf[..., :1])], dim=-1)
    return ((cdf[..., 1:] - cdf[..., :-1]) * torch.arange(256, dtype=torch.float64)).sum(-1)


def test_expected_level_equals_the_pmf_expectation_in_float64():
    mu = torch.tensor([-1.2, -0.99, -0.3, 0.0, 0.2511, 0.97, 1.1], dtype=torch.float64)
    log_scale = torch.tensor([-3.0, -4.0, -2.0, 0.5, -6.0, -3.5, -3.0], dtype=torch.float64)
    out = _expected_level(mu, log_scale)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _expected_level_reference(mu, log_scale), rtol=0, atol=1e-10)


def test_expected_level_keeps_the_device():
    mu = torch.zeros(2, 3, device="meta")
    out = _expected_level(mu, torch.zeros(2, 3, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 3)


@pytest.mark.parametrize("numel, max_elements, passes", [(6, 240, 7), (6, 3, 255), (1, 3, 85), (6, 10**6, 1)])
def test_expected_level_chunks_keep_the_temporary_small(monkeypatch, numel, max_elements, passes):
    torch.manual_seed(6)
    mu, log_scale = torch.randn(numel) * 0.5, torch.randn(numel) - 3
    whole = _expected_level(mu, log_scale)
    sizes, sigmoid = [], torch.sigmoid
    monkeypatch.setattr(torch, "sigmoid", lambda t: (sizes.append(t.numel()), sigmoid(t))[1])
    out = _expected_level(mu, log_scale, max_elements=max_elements)
    torch.testing.assert_close(out, whole)
    assert len(sizes) == passes and sum(sizes) == 255 * numel
    assert max(sizes) <= max(max_elements, numel)
