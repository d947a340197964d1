"""DiscMixLogistic: mean() against the exact expectation sum_v v * pmf(v), and sample() histograms
against the pmf, where the pmf is the distribution's own log_prob enumerated over pixel values
(grey: all 256 values; RGB: every (r, g, b) in a box holding all but < 1e-5 of each component's mass).
"""

from __future__ import annotations

import math

import pytest
import torch

from fusionvae.model.distributions import DiscMixLogistic

LEVELS = torch.arange(256, dtype=torch.float64)


def mixture(logits, means, log_scales, coeffs=None) -> torch.Tensor:
    """Params ``[1, P, 1, 1]`` of one pixel from per-channel lists of per-component values
    (layout of the class docstring: logits, means, log-scales, coupling coefficients pre-tanh)."""
    rows = [torch.tensor(logits, dtype=torch.float32)]
    rows += [torch.tensor(v, dtype=torch.float32) for v in (*means, *log_scales, *(coeffs or []))]
    return torch.cat(rows).view(1, -1, 1, 1)


def grey_pmf(params: torch.Tensor, num_mix: int) -> torch.Tensor:
    """``[256, P]`` pmf of grey pixels ``params [1, 3M, 1, P]`` over all values."""
    values = (LEVELS.float() / 255).view(256, 1, 1, 1).expand(256, 1, 1, params.shape[-1])
    lp = DiscMixLogistic(params.expand(256, -1, -1, -1), channels=1, num_mix=num_mix).log_prob(values)
    return lp.double().exp().view(256, -1)


def _component(params: torch.Tensor, m: int, num_mix: int, channels: int) -> torch.Tensor:
    rows = 2 * channels + channels * (channels - 1) // 2
    return params[:, [m] + [num_mix + j * num_mix + m for j in range(rows)]]


def _bins(lo: float, hi: float) -> range:
    return range(max(0, math.floor((lo + 1) * 127.5)), min(255, math.ceil((hi + 1) * 127.5)) + 1)


def rgb_pmf(params: torch.Tensor, num_mix: int, width: float = 14.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``[N, 3]`` (pixel values) and their probabilities ``[N]`` of a one-pixel RGB mixture:
    each component enumerated on the box where its channels lie within ``width`` scales of their
    (coupled) means; a logistic puts 2 / (1 + e^14) < 2e-6 outside that per channel."""
    weights = torch.softmax(params[0, :num_mix, 0, 0].double(), 0)
    points, probs = [], []
    for m in range(num_mix):
        one = _component(params, m, num_mix, 3)
        d = DiscMixLogistic(one, channels=3, num_mix=1)
        mu, s, c = (t[0, :, 0, 0, 0].tolist() for t in (d.means, d.log_scales.exp(), d.coeffs))
        r = _bins(mu[0] - width * s[0], mu[0] + width * s[0])
        xr = [r[0] / 127.5 - 1, r[-1] / 127.5 - 1]
        g_mu = [mu[1] + c[0] * x for x in xr]
        g = _bins(min(g_mu) - width * s[1], max(g_mu) + width * s[1])
        xg = [g[0] / 127.5 - 1, g[-1] / 127.5 - 1]
        b_mu = [mu[2] + c[1] * x + c[2] * y for x in xr for y in xg]
        b = _bins(min(b_mu) - width * s[2], max(b_mu) + width * s[2])
        grid = torch.stack(torch.meshgrid(torch.tensor(r), torch.tensor(g), torch.tensor(b), indexing="ij"), -1).view(
            -1, 3
        )
        lp = DiscMixLogistic(one.expand(len(grid), -1, -1, -1), channels=3, num_mix=1).log_prob(
            grid.float().view(-1, 3, 1, 1) / 255
        )
        p = lp.double().exp().view(-1)
        assert p.sum() > 1 - 1e-5, (m, p.sum())  # the box holds the component's mass
        points.append(grid)
        probs.append(weights[m] * p)
    return torch.cat(points), torch.cat(probs)


def chi_square(samples: torch.Tensor, pmf: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic of integer ``samples`` against ``pmf`` over ``len(pmf)`` cells, cells with
    fewer than 5 expected counts pooled into one; returns (statistic, degrees of freedom)."""
    n = samples.numel()
    counts = torch.bincount(samples.view(-1), minlength=len(pmf)).double()
    expected = pmf.double() * n
    keep = expected >= 5
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    rest_o, rest_e = counts[~keep].sum(), expected[~keep].sum()
    if rest_e > 0:
        stat = stat + (rest_o - rest_e) ** 2 / rest_e
    return stat.item(), int(keep.sum()) - (0 if rest_e > 0 else 1)


def chi_square_bound(dof: int) -> float:
    """Mean + 6 standard deviations of a chi-square: exceeded with probability < 1e-6."""
    return dof + 6 * math.sqrt(2 * dof)


# ---- grey ---------------------------------------------------------------------------------------
GREY_INSIDE = mixture([0.5, -0.3, 0.1], [[-0.6, 0.05, 0.7]], [[-3.0, -2.2, -4.0]])  # all mass well inside
GREY_EDGES = mixture([0.2, 0.0, -0.4], [[-1.05, 0.3, 0.97]], [[-2.5, -1.5, -3.0]])  # piles at 0 and 255


def test_grey_mean_is_the_exact_expectation_for_components_inside_the_range():
    params = torch.cat([GREY_INSIDE, mixture([0.0, 0.0, 0.0], [[0.1, 0.2, 0.3]], [[-2.5, -2.5, -2.5]])], dim=-1)
    pmf = grey_pmf(params, 3)
    torch.testing.assert_close(pmf.sum(0), torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)
    exact = (LEVELS.view(256, 1) / 255 * pmf).sum(0)
    # 1e-4 is 1/40 of a pixel level; a mean off by a level (or a missing mixture weight) is far above
    torch.testing.assert_close(DiscMixLogistic(params, 1, 3).mean().double().view(-1), exact, atol=1e-4, rtol=0)


def test_grey_mean_is_the_exact_expectation_with_mass_on_the_edges():
    pmf = grey_pmf(GREY_EDGES, 3)
    exact = (LEVELS.view(256, 1) / 255 * pmf).sum(0)
    torch.testing.assert_close(DiscMixLogistic(GREY_EDGES, 1, 3).mean().double().view(-1), exact, atol=1e-4, rtol=0)


@pytest.mark.parametrize("params", [GREY_INSIDE, GREY_EDGES], ids=["inside", "edges"])
def test_grey_sample_histogram_matches_the_pmf(params):
    n = 100_000
    torch.manual_seed(0)
    samples = DiscMixLogistic(params.expand(n, -1, -1, -1), 1, 3).sample().view(-1)
    assert torch.equal(samples * 255, (samples * 255).round())
    values = (samples * 255).round().long()
    pmf = grey_pmf(params, 3)[:, 0]
    stat, dof = chi_square(values, pmf)
    assert stat < chi_square_bound(dof), (stat, dof)
    # the bound has power: the same samples against scales 20 % wider fail it by far
    wider = params.clone()
    wider[:, 6:9] += math.log(1.2)
    assert chi_square(values, grey_pmf(wider, 3)[:, 0])[0] > 2 * chi_square_bound(dof)


# ---- RGB with channel coupling -------------------------------------------------------------------
RGB_ONE = mixture([0.0], [[-0.2], [0.3], [0.1]], [[-3.8], [-4.0], [-3.6]], [[0.6], [-0.5], [0.4]])
RGB_TWO = mixture(
    [0.3, -0.2],
    [[-0.3, 0.4], [0.2, -0.5], [0.1, 0.3]],
    [[-4.0, -3.6], [-3.8, -4.0], [-3.9, -3.7]],
    [[0.5, -0.4], [-0.3, 0.45], [0.35, -0.3]],
)


def _exact_rgb_mean(params, num_mix):
    points, probs = rgb_pmf(params, num_mix)
    assert probs.sum() > 1 - 1e-5
    return (probs.view(-1, 1) * points.double() / 255).sum(0)


def test_rgb_mean_with_coupling_is_exact_for_one_component():
    exact = _exact_rgb_mean(RGB_ONE, 1)
    torch.testing.assert_close(DiscMixLogistic(RGB_ONE, 3, 1).mean().double().view(-1), exact, atol=1e-4, rtol=0)


def test_rgb_mean_with_coupling_is_exact_for_a_mixture():
    exact = _exact_rgb_mean(RGB_TWO, 2)
    torch.testing.assert_close(DiscMixLogistic(RGB_TWO, 3, 2).mean().double().view(-1), exact, atol=1e-4, rtol=0)


def test_rgb_sample_histograms_match_the_coupled_pmf():
    n = 200_000
    points, probs = rgb_pmf(RGB_TWO, 2)
    torch.manual_seed(1)
    samples = (DiscMixLogistic(RGB_TWO.expand(n, -1, -1, -1), 3, 2).sample().view(n, 3) * 255).round().long()
    for c in range(3):  # marginals
        marginal = torch.zeros(256, dtype=torch.float64).index_add_(0, points[:, c], probs)
        stat, dof = chi_square(samples[:, c], marginal)
        assert stat < chi_square_bound(dof), (c, stat, dof)
    # the joint on 16 levels per channel: the coupling, not only the marginals
    cell = lambda v: (v[:, 0] // 16) * 256 + (v[:, 1] // 16) * 16 + v[:, 2] // 16  # noqa: E731
    joint = torch.zeros(16**3, dtype=torch.float64).index_add_(0, cell(points), probs)
    stat, dof = chi_square(cell(samples), joint)
    assert stat < chi_square_bound(dof), (stat, dof)
    # a sampler ignoring the coupling keeps the red marginal but fails the joint
    uncoupled = RGB_TWO.clone()
    uncoupled[:, -6:] = 0.0
    torch.manual_seed(1)
    other = (DiscMixLogistic(uncoupled.expand(n, -1, -1, -1), 3, 2).sample().view(n, 3) * 255).round().long()
    assert chi_square(cell(other), joint)[0] > 3 * chi_square_bound(dof)
