"""Baseline model configs (CVAE, FCN, with and without skips), ablation switches and the
comparison / ablation multirun recipes."""

import math
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fusionvae.jobs.train import train
from tests.conftest import CONF, ROOT, TINY, compose_cfg


def fdr_cfg(data_dir, tmp_path, *overrides):
    return compose_cfg(
        "train", [*TINY, "debug=fdr", f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path}", *overrides]
    )


@pytest.mark.parametrize(
    "model, groups, stochastic, skip",
    [
        ("cvae", 1, True, "none"),
        ("cvae_skip", 1, True, "max"),
        ("fcn", 3, False, "none"),
        ("fcn_skip", 3, False, "max"),
    ],
)
def test_baseline_trains_one_fast_dev_run_step(data_dir, tmp_path, model, groups, stochastic, skip):
    cfg = fdr_cfg(data_dir, tmp_path, f"model={model}")
    module = instantiate(cfg.model)
    # the same encoder, aggregation and likelihood as FusionVAE, with the baseline's switches
    assert module.net.num_groups == groups and module.net.stochastic is stochastic and module.net.skip == skip
    assert module.net.aggregation == "max" and module.net.likelihood_cls.__name__ == "DiscMixLogistic"
    metrics = train(cfg)
    for k in range(4):
        assert math.isfinite(metrics[f"val/nelbo_k{k}"]) and metrics[f"val/nelbo_k{k}"] > 0


def test_fcn_has_no_kl_and_the_skip_changes_the_output():
    base = instantiate(compose_cfg("train", [*TINY, "model=fcn"]).model).eval()
    skip = instantiate(compose_cfg("train", [*TINY, "model=fcn_skip"]).model).eval()
    skip.load_state_dict(base.state_dict())  # same weights: skips are parameter-free
    batch = torch.rand(2, 4, 1, 32, 32)
    with torch.no_grad():
        _terms = base.terms(batch, 2)
        recon, kl = _terms.nll, _terms.kl
        _terms = skip.terms(batch, 2)
        recon_skip, _ = _terms.nll, _terms.kl
        assert torch.all(kl == 0) and torch.isfinite(recon).all()
        assert not torch.allclose(recon, recon_skip)
        _terms = base.terms(batch, 0)
        recon0, _ = _terms.nll, _terms.kl
        _terms = skip.terms(batch, 0)
        recon0_skip, _ = _terms.nll, _terms.kl  # K = 0: nothing to skip
        torch.testing.assert_close(recon0, recon0_skip)


@pytest.mark.parametrize(
    "override",
    [
        "model.aggregation=mean",
        "model.aggregation=bayes",
        "model.aggregation=bayes_official",
        "model.aggregation_level=params",
        "model.res_dist=true",
        "model.skip=max",
        "model.skip=mean",
        "model.skip=max_add",
        "model.skip=mean_add",
    ],
)
def test_ablation_switches_build_and_run(override):
    level = ["model.aggregation_level=params"] if "bayes" in override else []  # they combine distributions
    module = instantiate(compose_cfg("train", [*TINY, *level, override]).model).eval()
    key, value = override.split("=")
    assert str(getattr(module.net, key.split(".")[1])).lower() == value
    with torch.no_grad():
        _terms = module.terms(torch.rand(2, 4, 1, 32, 32), 3)
        recon, kl = _terms.nll, _terms.kl
    assert torch.isfinite(recon).all() and torch.isfinite(kl).all() and torch.all(kl.sum(1) > 0)


def test_sweep_recipes():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cmp = compose("train", overrides=["hparams_search=comparison"], return_hydra_config=True)
        abl = compose("train", overrides=["hparams_search=ablation"], return_hydra_config=True)
    assert str(cmp.hydra.mode) == "RunMode.MULTIRUN"
    assert dict(cmp.hydra.sweeper.params) == {"model": "fusionvae,cvae,fcn", "model.skip": "none,max"}
    assert dict(abl.hydra.sweeper.params) == {
        "model": "fusionvae",
        "model.aggregation_level": "params",
        "model.aggregation": "max,mean,bayes,bayes_official",
        "model.res_dist": "false,true",
    }


def test_comparison_multirun_trains_the_grid(data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [
        sys.executable,
        "train.py",
        "hparams_search=comparison",
        *TINY,
        "callbacks.image_grids=null",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    combos = set()
    for job in jobs:
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        model = next(m for m in ("fusionvae", "cvae", "fcn") if f"- model={m}\n" in overrides)
        skip = next(s for s in ("none", "max") if f"- model.skip={s}\n" in overrides)
        combos.add((model, skip))
        hparams = (job / "csv" / "version_0" / "hparams.yaml").read_text()
        assert f"skip: {skip}" in hparams and ("stochastic: false" in hparams) == (model == "fcn")
    assert combos == {(m, s) for m in ("fusionvae", "cvae", "fcn") for s in ("none", "max")}
