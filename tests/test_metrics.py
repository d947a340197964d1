"""Metric maths (fusionvae.evaluation.metrics) on known images, checked against torchmetrics."""

import math

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio as tm_psnr
from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

from fusionvae.evaluation.metrics import central_crop, log_mean_exp, mse, psnr, sample_metrics, ssim


def images(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(shape, generator=g)
    noisy = (clean + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    return clean, noisy


@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (3, 3, 32, 32), (2, 1, 16, 24)])
def test_ssim_and_psnr_match_torchmetrics(shape):
    clean, noisy = images(shape)
    blurred = torch.nn.functional.avg_pool2d(clean, 3, 1, 1)
    for pred in (noisy, blurred, 1 - clean, torch.full_like(clean, 0.5)):
        expected = tm_ssim(pred, clean, data_range=1.0, reduction="none")
        torch.testing.assert_close(ssim(pred, clean), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            psnr(pred, clean),
            tm_psnr(pred, clean, data_range=1.0, reduction="none", dim=(1, 2, 3)),
            atol=1e-4,
            rtol=1e-5,
        )


def test_known_values():
    target = torch.zeros(2, 1, 12, 12)
    pred = torch.full_like(target, 0.1)
    torch.testing.assert_close(mse(pred, target), torch.full((2,), 0.01))
    torch.testing.assert_close(psnr(pred, target), torch.full((2,), 20.0))
    x = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    assert torch.all(psnr(x, x) == 100.0)  # identical images: MSE floored, no inf
    assert ssim(x, 1 - x).mean() < 0  # anti-correlated structure


def test_per_image_values_are_independent_of_the_batch():
    clean, noisy = images((5, 1, 20, 20), seed=1)
    batch = torch.stack([ssim(noisy[i : i + 1], clean[i : i + 1])[0] for i in range(5)])
    torch.testing.assert_close(ssim(noisy, clean), batch)


def test_shape_checks():
    with pytest.raises(ValueError, match="one shape"):
        mse(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="larger"):
        ssim(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match="crop"):
        central_crop(torch.zeros(1, 1, 4, 4), 2)


def test_log_mean_exp():
    log_w = torch.tensor([[0.0, 0.0, 0.0], [1000.0, 1000.0 + math.log(2), -math.inf]], dtype=torch.float64)
    out = log_mean_exp(log_w, dim=1)
    torch.testing.assert_close(out, torch.tensor([0.0, 1000.0], dtype=torch.float64))
    small = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(log_mean_exp(small), small.exp().mean(-1).log())


def test_best_and_mean_of_n():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 16, 16, generator=g)
    levels = torch.tensor([0.3, 0.05, 0.2])  # sample 1 is the closest to the target
    noise = torch.randn(2, 3, 1, 16, 16, generator=g)
    samples = (target.unsqueeze(1) + levels.view(1, 3, 1, 1, 1) * noise).clamp(0, 1)
    out = sample_metrics(samples, target)
    per = {
        name: torch.stack([fn(samples[:, j], target) for j in range(3)], dim=1)
        for name, fn in (("mse", mse), ("psnr", psnr), ("ssim", ssim))
    }
    torch.testing.assert_close(out["mse_best"], per["mse"].amin(1))
    torch.testing.assert_close(out["psnr_best"], per["psnr"].amax(1))
    torch.testing.assert_close(out["ssim_best"], per["ssim"].amax(1))
    for name in ("mse", "psnr", "ssim"):
        torch.testing.assert_close(out[f"{name}_mean"], per[name].mean(1))
    assert torch.equal(per["mse"].argmin(1), torch.tensor([1, 1]))
    assert torch.all(out["mse_best"] < out["mse_mean"]) and torch.all(out["ssim_best"] > out["ssim_mean"])


def test_sample_metrics_use_the_central_crop():
    target = torch.rand(1, 1, 32, 32)
    sample = target.clone()
    sample[..., :2, :] = 1 - sample[..., :2, :]  # differs only in the border
    out = sample_metrics(sample.unsqueeze(1), target, crop=2)
    assert out["mse_best"].item() == 0 and out["psnr_best"].item() == 100.0
    torch.testing.assert_close(out["ssim_mean"], torch.ones(1))
    assert sample_metrics(sample.unsqueeze(1), target, crop=0)["mse_best"].item() > 0


def test_diversity_is_the_mean_pairwise_rms_distance():
    from fusionvae.evaluation.metrics import diversity

    a, b, c = torch.zeros(1, 16), torch.full((1, 16), 0.5), torch.full((1, 16), 0.25)
    # pairs (a,b)=0.5, (a,c)=0.25, (b,c)=0.25: mean over ordered pairs = (0.5 + 0.25 + 0.25) / 3
    got = diversity(torch.stack([a, b, c], dim=1))
    torch.testing.assert_close(got, torch.tensor([1.0 / 3.0]))
    assert diversity(torch.rand(4, 1, 16)).tolist() == [0.0] * 4  # one sample: no pairs


def test_semantic_metrics_compare_samples_with_the_class_of_the_target():
    from fusionvae.evaluation.classifier import semantic_metrics

    class Brightness(torch.nn.Module):  # class 1 for a bright image, else 0
        def forward(self, images):
            bright = images.flatten(1).mean(1) > 0.5
            return torch.stack([~bright, bright], dim=1).float()

    target = torch.stack([torch.ones(1, 4, 4), torch.zeros(1, 4, 4)])  # classes 1, 0
    samples = torch.stack([torch.stack([torch.ones(1, 4, 4), torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])] * 2)
    out = semantic_metrics(Brightness(), samples, target)  # item 0: 2 of 3 right; item 1: 1 of 3 right
    torch.testing.assert_close(out["class_mean"], torch.tensor([2 / 3, 1 / 3]))
    assert out["class_best"].tolist() == [1.0, 1.0]
    none_right = semantic_metrics(Brightness(), torch.zeros(1, 2, 1, 4, 4), torch.ones(1, 1, 4, 4))
    assert none_right["class_best"].tolist() == [0.0] and none_right["class_mean"].tolist() == [0.0]
