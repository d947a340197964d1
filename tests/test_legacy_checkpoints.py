"""Checkpoints written before ``model.aggregation_level`` (tests/legacy_checkpoints, made at commit 1f31b6e
by its make_legacy.py) load as what they were trained as (the ``params`` level; skips ``max`` as
``max_add``) and compute what that code computed; resuming one asks for the override in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_cfg

from fusionvae.errors import CheckpointError
from fusionvae.evaluation.evaluator import EvalSettings, evaluate_batch
from fusionvae.jobs.evaluate import load_model, run_evaluation
from fusionvae.model.network_config import legacy_overrides
from fusionvae.model.objective import split_views
from fusionvae.training.resume import check_model, read_checkpoint

LEGACY = Path(__file__).resolve().parent / "legacy_checkpoints"
NUMBERS = json.loads((LEGACY / "numbers.json").read_text())
SETTINGS = EvalSettings(iw_samples=3, iw_chunk=3, num_samples=2, grid_images=0)  # as make_legacy.py


def inputs() -> torch.Tensor:
    return torch.rand(4, 4, 1, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(("name", "skip"), [("fusionvae_max", "none"), ("cvae_skip_max", "max_add")])
def test_legacy_checkpoint_loads_and_computes_what_it_did(name, skip):
    module = load_model(str(LEGACY / f"{name}.ckpt")).eval()
    assert (module.hparams.aggregation_level, module.hparams.skip) == ("params", skip)
    assert (module.net.aggregation_level, module.net.skip) == ("params", skip)
    for k, old in NUMBERS[name].items():
        views, target = split_views(inputs(), int(k))
        torch.manual_seed(11)
        with torch.no_grad():
            out = module.net(views, target)
            mean_image = module.net(views, None, t=0.0).likelihood.mean()
        torch.testing.assert_close(out.kl.sum(1), torch.tensor(old["kl"]), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out.log_q, torch.tensor(old["log_q"]), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out.log_p, torch.tensor(old["log_p"]), rtol=1e-5, atol=1e-4)
        assert float(mean_image.double().sum()) == pytest.approx(old["mean_image_sum"], rel=1e-6)
        torch.manual_seed(13)
        metrics = evaluate_batch(module, inputs(), int(k), SETTINGS)
        for metric, values in old["metrics"].items():
            torch.testing.assert_close(metrics[metric].double(), torch.tensor(values).double(), rtol=1e-5, atol=1e-5)


def test_as_features_the_same_weights_compute_something_else():
    """The override matters: the max-aggregation checkpoint read at today's default level differs at K >= 2."""
    module = load_model(str(LEGACY / "fusionvae_max.ckpt")).eval()
    module.net.latent_groups.apply(lambda m: setattr(m, "level", "features") if hasattr(m, "level") else None)
    views, target = split_views(inputs(), 3)
    torch.manual_seed(11)
    with torch.no_grad():
        kl = module.net(views, target).kl.sum(1)
    assert not torch.allclose(kl, torch.tensor(NUMBERS["fusionvae_max"]["3"]["kl"]), rtol=1e-3)


def evaluate_small(ckpt: Path, data_dir: Path, out: Path, grid_images: int) -> dict:
    """``evaluate.py`` on one test batch of ``ckpt``, S = N = 2, results in ``out``."""
    dataset = [o for o in TINY if o.startswith("dataset.")]
    paths = [f"paths.data_dir={data_dir}", f"paths.output_dir={out}", f"ckpt_path={ckpt}"]
    small = [
        "trainer.limit_test_batches=1",
        "eval.iw_samples=2",
        "eval.num_samples=2",
        f"eval.grid_images={grid_images}",
    ]
    cfg = compose_cfg("evaluate", [*dataset, *paths, *small])
    return run_evaluation(cfg)


def test_legacy_checkpoint_evaluates_end_to_end(data_dir, tmp_path):
    results = evaluate_small(LEGACY / "cvae_skip_max.ckpt", data_dir, tmp_path, grid_images=2)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(results) == [0, 1, 2, 3] and saved["model"]["aggregation_level"] == "params"
    assert saved["model"]["skip"] == "max_add" and (tmp_path / "per_item.csv").is_file()


def test_resuming_a_legacy_checkpoint_names_the_override():
    hparams = read_checkpoint(LEGACY / "fusionvae_max.ckpt")["hyper_parameters"]
    assert legacy_overrides(hparams) == {"aggregation_level": "params", "skip": "none"}
    model = compose_cfg("train", [*TINY, "model.num_mix=3", "model.crop=2"]).model
    with pytest.raises(
        CheckpointError,
        match=r"aggregation_level: checkpoint 'params', config 'features'.*here: model.aggregation_level=params$",
    ):
        check_model(hparams, model, LEGACY / "fusionvae_max.ckpt")
    fixed = compose_cfg("train", [*TINY, "model.aggregation_level=params"]).model
    check_model(hparams, fixed, LEGACY / "fusionvae_max.ckpt")  # with the override it resumes


# made by train.py at 133af3e, the last commit before fusionvae/ moved into wings (issue 19): import
# paths and _target_ strings moved, state-dict keys did not
BEFORE_WINGS = LEGACY / "before_wings_last.ckpt"
SHORT = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "callbacks.progress_bar=null"]


def test_a_checkpoint_from_before_the_wings_trains_on(data_dir, tmp_path):
    from fusionvae.jobs.train import train

    ckpt = tmp_path / "before.ckpt"
    shutil.copy(BEFORE_WINGS, ckpt)
    cfg = compose_cfg("train", [*TINY, *SHORT, "trainer.max_epochs=2", f"ckpt_path={ckpt}",
                                f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path / 'run'}"])  # fmt: skip
    metrics = train(cfg)
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    old = torch.load(BEFORE_WINGS, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == old["global_step"] + 3 and resumed["epoch"] == 1
    assert set(resumed["state_dict"]) == set(old["state_dict"]) and math.isfinite(metrics["val/nelbo"])


def test_a_checkpoint_from_before_the_wings_evaluates(data_dir, tmp_path):
    results = evaluate_small(BEFORE_WINGS, data_dir, tmp_path, grid_images=0)
    assert sorted(results) == [0, 1, 2, 3] and all(math.isfinite(results[k]["iw_nll"]) for k in results)
