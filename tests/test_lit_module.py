import math

import pytest
import torch

from fusionvae.model.objective import log_likelihood, split_views
from fusionvae.model.sampling import draw, mean_image
from fusionvae.training.module import FusionVAEModule
from tests.test_network import TINY


def module(**kw) -> FusionVAEModule:
    return FusionVAEModule(**{**TINY, **kw})


def test_split_keeps_last_k_views_and_target():
    batch = torch.arange(5).float().view(1, 5, 1, 1, 1).expand(2, 5, 1, 4, 4)
    views, target = split_views(batch, 2)
    assert views[0, :, 0, 0, 0].tolist() == [2.0, 3.0] and target[0, 0, 0, 0] == 4.0
    assert split_views(batch, 0)[0].shape[1] == 0
    with pytest.raises(ValueError, match="K=5 views requested but the batch holds 4"):
        split_views(batch, 5)
    with pytest.raises(ValueError, match="K=-1"):
        split_views(batch, -1)


def test_draw_k_is_reproducible_and_uniform():
    a, b = module(seed=3), module(seed=3)
    draws = []
    for _ in range(400):
        draws.append(a.draw_k())
        assert b.draw_k() == draws[-1]
        a.train_batches += 1
        b.train_batches += 1
    counts = torch.bincount(torch.tensor(draws), minlength=4)
    assert counts.shape == (4,) and counts.min() > 60  # ~100 each
    other = module(seed=4)
    other_draws = []
    for _ in range(50):
        other_draws.append(other.draw_k())
        other.train_batches += 1
    assert other_draws != draws[:50]


def test_units_nats_and_bits_per_dim():
    target = torch.zeros(2, 3, 8, 8)
    nats = torch.tensor([100.0, 200.0])
    torch.testing.assert_close(module().units(nats, target), nats)
    bpd = module(bits_per_dim=True, crop=1).units(nats, target)
    torch.testing.assert_close(bpd, nats / (3 * 6 * 6 * math.log(2)))


def test_log_likelihood_uses_only_the_central_crop():
    m = module(crop=2)
    views, target = torch.rand(2, 3, 1, 32, 32), torch.rand(2, 1, 32, 32)
    out = m.net(views, target)
    full = out.likelihood.log_prob(target)
    torch.testing.assert_close(log_likelihood(out.likelihood, target, m.hparams.crop), full[:, 2:30, 2:30].sum((1, 2)))


def test_negative_k_max_rejected():
    with pytest.raises(ValueError, match="k_max must be >= 0"):
        module(k_max=-1)


def test_sampling_shapes_range_and_fp32_boundary():
    m = module().eval()
    views = torch.rand(3, 2, 1, 32, 32)
    for decode in ("mean", "sample"):
        img = draw(m.net, views, 2, t=0.7, decode=decode)
        assert img.shape == (3, 2, 1, 32, 32) and img.dtype == torch.float32 and img.min() >= 0 and img.max() <= 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mean_image(m.net, views).dtype == torch.float32
    with pytest.raises(ValueError, match="decode must be one of mean, sample, got 'median'"):
        draw(m.net, views, decode="median")


def test_distribution_maths_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    m = module().eval()
    batch = torch.rand(2, 4, 1, 32, 32)
    torch.manual_seed(1)
    _terms = m.terms(batch, 2)
    recon32, kl32 = _terms.nll, _terms.kl
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _terms = m.terms(batch, 2)
        recon, kl = _terms.nll, _terms.kl
        reg = m.regulariser()
    assert recon.dtype == kl.dtype == reg.dtype == torch.float32
    torch.testing.assert_close(recon, recon32, rtol=0.05, atol=1.0)
    torch.testing.assert_close(kl, kl32, rtol=0.05, atol=1.0)
