"""Evaluation: IW-NLL against the exact likelihood of a 1-D-latent model, chunking, fp32, BN
re-adjustment, grids, settings, and evaluate.py's job end to end on a tiny checkpoint."""

import csv
import json
import math

import pytest
import torch
from hydra.utils import instantiate

from fusionvae.evaluation.bn_readjust import batchnorm_layers, readjust_bn
from fusionvae.evaluation.evaluator import EvalSettings, evaluate_batch, importance_weighted
from fusionvae.jobs.evaluate import run_evaluation
from fusionvae.model.distributions import Normal
from fusionvae.model.objective import log_likelihood, split_views
from fusionvae.model.sampling import draw, fusion_grid
from fusionvae.training.module import FusionVAEModule
from tests.conftest import TINY, compose_cfg, save_checkpoint


def tiny_module(**overrides) -> FusionVAEModule:
    """The tiny MNIST-shaped model of the test configs (random weights)."""
    cfg = compose_cfg("train", [*TINY, *[f"model.{k}={v}" for k, v in overrides.items()]])
    return instantiate(cfg.model)


def fake_batch(b=4, views=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, views + 1, 1, size, size, generator=g)


# ---- IW-NLL against the exact value ---------------------------------------------------------------
def one_dim_latent_model() -> FusionVAEModule:
    """2x2 images, one latent group with a single 1x1 latent: log p(y|x) = log int p(y|z) p(z|x) dz
    is a 1-D integral. The decoder is made to depend strongly on z and the posterior is shifted
    and narrowed, so that q(z|x,y) is a poor proposal and the bounds are visibly loose."""
    torch.manual_seed(0)
    m = FusionVAEModule(
        k_max=1,
        channels=1,
        image_size=2,
        num_channels=4,
        num_preprocess_blocks=1,
        num_postprocess_blocks=1,
        num_latent_scales=1,
        num_groups_per_scale=1,
        num_latent_per_group=1,
        num_mix=2,
        channels_last=False,
    ).eval()
    with torch.no_grad():
        m.net.latent_groups[0].combiner.log_g += math.log(8)
        m.net.image_head[1].log_g += math.log(3)
        m.net.latent_groups[0].head.bias[0] += 1.0
        m.net.latent_groups[0].head.bias[1] -= 1.0
    return m


@torch.no_grad()
def exact_nll(m, views, target, monkeypatch, points=4001, width=10.0):
    """-log p(y|x) by quadrature over z = mu + sigma * u, u on a uniform grid in [-width, width]."""
    b = target.shape[0]
    u = torch.linspace(-width, width, points)
    seen = {}

    def grid_sample(self, t=1.0):
        seen["sigma"] = self.sigma
        return self.mu + self.sigma * u.repeat(b).view_as(self.mu)

    with monkeypatch.context() as patch:
        patch.setattr(Normal, "sample", grid_sample)
        out = m.net(views, None, repeats=points)
    log_py = log_likelihood(out.likelihood, target.repeat_interleave(points, 0), m.hparams.crop).view(b, points)
    dz = seen["sigma"].view(b, points)[:, 0] * (u[1] - u[0])
    return -(torch.logsumexp(log_py + out.log_p.view(b, points), dim=1) + dz.log())


@pytest.mark.parametrize("k", [0, 1])
def test_iw_nll_bounds_the_exact_nll_and_tightens_with_s(k, monkeypatch):
    m = one_dim_latent_model()
    items = fake_batch(3, views=1, size=2, seed=1)
    exact = exact_nll(m, *split_views(items, k), monkeypatch)
    assert torch.isfinite(exact).all()
    repeats = 100  # independent estimates per item
    views, target = split_views(items.repeat_interleave(repeats, 0), k)
    torch.manual_seed(1)
    gaps, errs = {}, {}
    for s in (1, 10, 100, 1000):
        est = importance_weighted(m, views, target, s, chunk=250)
        nll = est["iw_nll"].view(3, repeats)
        gaps[s] = nll.mean(1) - exact
        errs[s] = nll.std(1) / repeats**0.5
        nelbo = est["nelbo"].view(3, repeats).mean(1)
        # the estimate is never better than the exact value (in expectation); the NELBO is a looser bound
        assert torch.all(gaps[s] > -3 * errs[s] - 1e-3), (s, gaps[s], errs[s])
        assert torch.all(nelbo - exact > 0)
        if s == 1:
            first = nll
        if s == 1000:  # S = 1 equals the NELBO in expectation (NELBO averaged over 1000 draws)
            assert torch.all((first.mean(1) - nelbo).abs() < 4 * errs[1]), (first.mean(1), nelbo)
    for small, large in ((1, 10), (10, 100), (100, 1000)):
        assert torch.all(gaps[large] < gaps[small]), gaps
    assert torch.all(gaps[1] > 1.0) and torch.all(gaps[1000] < 0.3 * gaps[1])
    if k == 1:
        assert torch.all(gaps[1000] < 0.2)


def test_iw_is_chunked_over_samples_with_repeats():
    m = tiny_module().eval()
    calls = []
    forward = m.net.forward

    def spy(views, target=None, t=1.0, repeats=1):
        calls.append((views.shape[0], repeats, target is not None))
        return forward(views, target, t, repeats)

    m.net.forward = spy
    views, target = split_views(fake_batch(2), 2)
    out = importance_weighted(m, views, target, samples=23, chunk=10)
    assert [c[1] for c in calls] == [10, 10, 3] and all(c[0] == 2 and c[2] for c in calls)
    assert out["iw_nll"].shape == (2,) and out["iw_nll"].dtype == torch.float32
    assert torch.all(out["iw_nll"] <= out["nelbo"] + 1.0)


def test_deterministic_fcn_iw_nll_is_the_reconstruction_nll():
    m = tiny_module(stochastic=False).eval()
    batch = fake_batch(3)
    views, target = split_views(batch, 1)
    out = importance_weighted(m, views, target, samples=7, chunk=3)
    with torch.no_grad():
        recon = -log_likelihood(m.net(views, target).likelihood, target, m.hparams.crop)
    torch.testing.assert_close(out["iw_nll"], recon, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out["nelbo"], recon, rtol=1e-5, atol=1e-3)
    # evaluate_batch knows every draw is alike: one posterior pass and one prior pass suffice
    calls = []
    forward = m.net.forward
    m.net.forward = lambda views, target=None, t=1.0, repeats=1: (
        calls.append(repeats) or forward(views, target, t, repeats)
    )
    res = evaluate_batch(m, batch, 1, EvalSettings(iw_samples=50, iw_chunk=10, num_samples=6))
    assert calls == [1, 1]
    torch.testing.assert_close(res["iw_nll"], recon, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(res["mse_best"], res["mse_mean"])


def test_evaluation_maths_stay_fp32_under_autocast():
    m = tiny_module().eval()
    views, target = split_views(fake_batch(2), 3)
    torch.manual_seed(0)
    ref = importance_weighted(m, views, target, samples=4, chunk=4)["iw_nll"]
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = importance_weighted(m, views, target, samples=4, chunk=4)["iw_nll"]
    torch.testing.assert_close(under, ref)


def test_evaluate_batch_and_samples():
    m = tiny_module().eval()
    batch = fake_batch(3)
    settings = EvalSettings(iw_samples=5, iw_chunk=2, num_samples=4)
    out = evaluate_batch(m, batch, 2, settings)
    assert set(out) == {
        "nelbo",
        "iw_nll",
        "kl",
        "prior_sigma",
        "mse_best",
        "mse_mean",
        "psnr_best",
        "psnr_mean",
        "ssim_best",
        "ssim_mean",
        "diversity",
    }
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in out.values())
    assert torch.all(out["mse_best"] <= out["mse_mean"]) and torch.all(out["psnr_best"] >= out["psnr_mean"])
    assert torch.all(out["kl"] >= 0) and torch.all(out["kl"] <= out["nelbo"]) and torch.all(out["prior_sigma"] > 0.01)
    samples = draw(m.net, split_views(batch, 2)[0], 5, t=0.0, decode="mean", chunk=2)
    assert samples.shape == (3, 5, 1, 32, 32)
    torch.testing.assert_close(samples[:, 0], samples[:, 4])  # t = 0, mean images: all alike
    drawn = draw(m.net, split_views(batch, 2)[0], 2, t=1.0, decode="sample")
    assert torch.all((drawn * 255 - (drawn * 255).round()).abs() < 1e-3)  # quantised samples


def test_settings_validation():
    with pytest.raises(ValueError, match="unknown eval settings: bogus"):
        EvalSettings.from_cfg({"bogus": 1})
    with pytest.raises(ValueError, match="decode"):
        EvalSettings(decode="median")
    with pytest.raises(ValueError, match="iw_samples"):
        EvalSettings(iw_samples=0)


def test_eval_config_dataset_defaults():
    assert compose_cfg("evaluate", ["ckpt_path=x"]).eval.iw_samples == 1000
    for dataset in ("celeba", "tless"):
        assert compose_cfg("evaluate", ["ckpt_path=x", f"dataset={dataset}"]).eval.iw_samples == 100
    cfg = compose_cfg("evaluate", ["ckpt_path=x", "dataset=celeba", "eval.iw_samples=5", "trainer=gpu"])
    assert cfg.eval.iw_samples == 5 and cfg.trainer.precision == "32-true" and cfg.trainer.accelerator == "gpu"


# ---- BN re-adjustment and grids -----------------------------------------------------------------
def test_bn_readjust_changes_a_copy_only():
    m = tiny_module().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    batches = [fake_batch(4, seed=s) for s in range(3)]
    adj = readjust_bn(m, batches, t=0.6, num_batches=3)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # original untouched
    assert not adj.training and all(not bn.training for bn in batchnorm_layers(adj))
    assert all(bn.momentum == 0.05 for bn in batchnorm_layers(adj))
    changed = [
        not torch.allclose(a.running_mean, b.running_mean) for a, b in zip(batchnorm_layers(adj), batchnorm_layers(m))
    ]
    assert all(changed)  # K = 3 first, so encoder and decoder layers all saw data
    assert all(int(bn.num_batches_tracked) in (2, 3) for bn in batchnorm_layers(adj))  # K = 0 skips the encoder


def test_bn_readjust_keeps_statistics_of_layers_it_never_reached():
    m = tiny_module().eval()
    enc = m.net.preprocess[0]
    enc_bn = batchnorm_layers(enc)
    with torch.no_grad():
        for bn in enc_bn:
            bn.running_mean.fill_(0.3)
    adj = readjust_bn(m, [fake_batch(4, views=0)], t=1.0, num_batches=1)  # no views: K = 0, no encoder pass
    for bn in batchnorm_layers(adj.net.preprocess[0]):
        assert torch.all(bn.running_mean == 0.3)
    dec_bn = batchnorm_layers(adj.net.postprocess)
    assert all(int(bn.num_batches_tracked) == 1 for bn in dec_bn)


def test_grid_layout_labels_and_nan_check():
    m = tiny_module().eval()
    views, target = split_views(fake_batch(2), 1)
    grid = fusion_grid({0.0: m.net, 0.8: m.net, 1.0: m.net}, views, target, 3, samples_per_t=2)
    # columns: 3 input slots, target, mean, 2 samples at t=0.8, 2 at t=1.0 -> 9 cells of 32 px enlarged
    # to 64 (+ 2 px padding), under a 14 px header of labels
    assert grid.shape == (3, 14 + 2 * 66 + 2, 9 * 66 + 2)
    assert torch.all(grid[:, 14 + 2 : 14 + 66, 2:66] != 0)  # an empty input slot is crossed out, not black
    with torch.no_grad():
        m.net.image_head[1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite pixels in the K=1 grid"):
        fusion_grid({0.0: m.net}, views, target, 3)


# ---- evaluate.py's job --------------------------------------------------------------------------
def test_run_evaluation_writes_metrics_report_and_grids(data_dir, tmp_path, caplog):
    import logging

    ckpt = save_checkpoint(tiny_module(), tmp_path / "ckpt" / "last.ckpt")
    out = tmp_path / "eval"
    cfg = compose_cfg(
        "evaluate",
        [
            *[o for o in TINY if o.startswith("dataset.")],
            "dataset.val_batch_size=4",
            f"paths.data_dir={data_dir}",
            f"paths.output_dir={out}",
            f"ckpt_path={ckpt}",
            "trainer.limit_test_batches=2",
            "eval.iw_samples=6",
            "eval.iw_chunk=4",
            "eval.num_samples=3",
            "eval.grid_images=2",
            "eval.bn_readjust=true",
            "eval.bn_readjust_batches=2",
        ],
    )
    with caplog.at_level(logging.INFO, logger="fusionvae"):
        results = run_evaluation(cfg)
    table = caplog.text.split("K  NELBO (nats)", 1)[1].splitlines()  # the compact per-K table, then the folder
    assert [line.split()[0] for line in table[1:5]] == ["0", "1", "2", "3"]
    assert f"{results[3]['iw_nll']:.2f}" in table[4] and caplog.text.rstrip().endswith(str(out))
    saved = json.loads((out / "metrics.json").read_text())
    assert [row["K"] for row in saved["per_k"]] == [0, 1, 2, 3] and sorted(results) == [0, 1, 2, 3]
    for k in range(4):
        row, err = saved["per_k"][k], saved["stderr"][k]
        for name in ("nelbo", "iw_nll", "mse_best", "mse_mean", "psnr_best", "psnr_mean", "ssim_best", "ssim_mean"):
            assert math.isfinite(results[k][name]) and row[name] == pytest.approx(results[k][name])
            assert err[name] >= 0 and math.isfinite(err[name])
        assert results[k]["iw_nll"] <= results[k]["nelbo"] + 1.0  # untrained: a wide gap
        assert -1 <= results[k]["ssim_mean"] <= results[k]["ssim_best"] <= 1
    assert saved["items"] == 8 and saved["mean_over_k"]["nelbo"] == pytest.approx(
        sum(results[k]["nelbo"] for k in range(4)) / 4
    )
    assert saved["units"] == "nats" and saved["model"]["name"] == "fusionvae" and saved["eval"]["iw_samples"] == 6
    assert saved["test_batches"] == 2
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["K"] for r in rows] == ["0", "1", "2", "3"]
    assert float(rows[2]["iw_nll"]) == pytest.approx(results[2]["iw_nll"])
    md = (out / "metrics.md").read_text()
    assert "| K | NELBO (nats) | IW-NLL (nats) |" in md and md.count("\n| ") == 5 and " ± " in md
    assert (out / "metrics_vs_k.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"grid_k{k}.png" for k in range(4)]
    per_item = list(csv.DictReader(open(out / "per_item.csv")))  # one row per (item, K), loadable in one line
    assert len(per_item) == 4 * 8 and [(r["K"], r["item"]) for r in per_item[:2]] == [("0", "0"), ("0", "1")]
    for k in range(4):
        rows_k = [r for r in per_item if r["K"] == str(k)]
        assert [int(r["item"]) for r in rows_k] == list(range(8))
        for name in ("iw_nll", "kl", "prior_sigma", "ssim_best"):
            assert sum(float(r[name]) for r in rows_k) / 8 == pytest.approx(results[k][name], rel=1e-6)
    logged = (out / "csv" / "version_0" / "metrics.csv").read_text()  # the loggers got the metrics too
    assert "eval/iw_nll_k3" in logged and "eval/ssim_best_k0" in logged
