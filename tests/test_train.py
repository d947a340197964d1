"""End-to-end training through the Hydra configs (tiny model, real MNIST, a few batches)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException

from fusionvae.jobs.evaluate import run_evaluation
from fusionvae.jobs.train import train
from fusionvae.training.build import build
from tests.conftest import ROOT, TINY, compose_cfg
from tests.test_run_logging import strings

SHORT = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
]


def cfg_for(data_dir, out: Path, *overrides, name="train"):
    base = TINY if name == "train" else [o for o in TINY if o.startswith("dataset.")]
    return compose_cfg(name, [*base, f"paths.data_dir={data_dir}", f"paths.output_dir={out}", *overrides])


def test_fast_dev_run(data_dir, tmp_path):
    metrics = train(cfg_for(data_dir, tmp_path, "debug=fdr"))
    for k in range(4):
        assert torch.isfinite(torch.tensor(metrics[f"val/nelbo_k{k}"]))
        assert 0 <= metrics[f"val/kl_k{k}"] < metrics[f"val/nelbo_k{k}"] and metrics[f"val/prior_sigma_k{k}"] > 0.01
    assert metrics["val/nelbo"] > 0


def test_train_evaluate_resume(data_dir, tmp_path):
    run = tmp_path / "run"
    train(cfg_for(data_dir, run, *SHORT))
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    ckpt = torch.load(last, weights_only=True)  # hyperparameters are primitives
    assert ckpt["global_step"] == 3
    assert ckpt["hyper_parameters"]["aggregation"] == "max"
    assert any(k.startswith("spectral.u") for k in ckpt["state_dict"])
    assert sorted((run / "images").glob("grid_k3_epoch0000.png"))

    # evaluate.py's job on the checkpoint: per-K metrics, written to JSON
    ev = cfg_for(
        data_dir,
        tmp_path / "eval",
        f"ckpt_path={last}",
        "trainer.limit_test_batches=1",
        "eval.iw_samples=8",
        "eval.num_samples=2",
        "eval.grid_images=2",
        name="evaluate",
    )
    results = run_evaluation(ev)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for k in range(4):
        assert saved["per_k"][k]["nelbo"] == pytest.approx(results[k]["nelbo"]) and results[k]["nelbo"] > 0

    # resume: the second epoch continues from step 3 with the restored state
    train(cfg_for(data_dir, run, *SHORT, "trainer.max_epochs=2", f"ckpt_path={last}"))
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 6 and resumed["epoch"] == 1
    assert int(resumed["state_dict"]["train_batches"]) == 6


def test_non_finite_steps_are_skipped_and_counted(data_dir, tmp_path):
    cfg = cfg_for(data_dir, tmp_path, *SHORT, "trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=0")
    datamodule, model, trainer = build(cfg)
    before = {k: v.clone() for k, v in model.net.state_dict().items() if "running" not in k and "num_batches" not in k}
    model.regulariser = lambda: torch.tensor(float("nan"))
    trainer.fit(model, datamodule=datamodule)
    assert int(model.skipped_steps) == 3
    after = model.net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_missing_data_fails_with_a_clear_message(tmp_path):
    cfg = cfg_for(tmp_path / "nowhere", tmp_path / "out", "debug=fdr")
    datamodule, model, trainer = build(cfg)
    with pytest.raises(FileNotFoundError, match="FUSIONVAE_DATA_DIR"):
        trainer.fit(model, datamodule=datamodule)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.aggregation=median", "unknown aggregation 'median'"),
        ("dataset.k_max=-1", "k_max must be >= 0"),
        ("dataset.image_size=30", "image_size"),
    ],
)
def test_invalid_config_values_fail_fast(tmp_path, override, message):
    cfg = cfg_for(tmp_path, tmp_path, override)
    with pytest.raises((ValueError, InstantiationException), match=message):
        build(cfg)


def run_cli(args, tmp_path, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_multirun_sweep_gives_one_wandb_run_per_job(data_dir, tmp_path):
    """Two jobs (W&B and CSV, 2 training steps, the trainer's default logging interval): one W&B run
    each, named by the key the sweep varies; training curves from the first step; each setting
    logged once and no absolute path; the sweep ends with its summary table."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            "model.aggregation=max,bayes",
            "model.aggregation_level=params",  # bayes combines distributions
            *[o for o in TINY if not o.startswith("logger")],
            "logger=many",
            "logger.tensorboard=null",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            f"paths.data_dir={data_dir}",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    runs = [sorted((job / "wandb").glob("offline-run-*")) for job in jobs]
    assert all(len(r) == 1 for r in runs) and runs[0][0].name != runs[1][0].name
    overrides = [(job / ".hydra" / "overrides.yaml").read_text() for job in jobs]
    assert "model.aggregation=max" in overrides[0] and "model.aggregation=bayes" in overrides[1]
    # one W&B group for the sweep; each run named by what varies (the offline record holds the
    # name as a length-prefixed string: the whole name, not a prefix of a longer one)
    records = [next(r[0].glob("*.wandb")).read_bytes() for r in runs]
    assert all(f"train-{sweep.name}".encode() in rec for rec in records)
    for rec, name in zip(records, ("model.aggregation=max", "model.aggregation=bayes")):
        assert bytes([len(name)]) + name.encode() in rec
    for job in jobs:
        logged_once_without_absolute_paths(job / "csv" / "version_0", data_dir)
        steps = [r["step"] for r in csv_rows(job / "csv" / "version_0" / "metrics.csv") if r["train/nelbo"]]
        assert steps == ["0", "1"]  # a curve from the first step, with trainer.log_every_n_steps=50
    table = (sweep / "summary.md").read_text()
    assert table in proc.stdout
    rows = csv_rows(sweep / "summary.csv")
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        ("0", "model.aggregation=max", "done"),
        ("1", "model.aggregation=bayes", "done"),
    ]
    for row, job in zip(rows, jobs):
        result = json.loads((job / "result.json").read_text())
        assert float(row["best val/nelbo"]) == pytest.approx(result["best"]["score"])
        per_k = [float(row[f"val/nelbo_k{k}"]) for k in range(4)]
        assert per_k == pytest.approx([result["last"][f"val/nelbo_k{k}"] for k in range(4)])


def csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def logged_once_without_absolute_paths(csv_log: Path, data_dir: Path) -> None:
    """What the loggers received (the CSV logger keeps every log_hyperparams call): the config's
    top-level keys and parameter counts only (not the module's hyperparameters a second time), no
    key that repeats another, no absolute path."""
    import yaml

    hparams = yaml.safe_load((csv_log / "hparams.yaml").read_text())
    top = {"dataset", "model", "trainer", "logger", "callbacks", "paths", "task_name", "seed", "tags", "run_name"}
    assert set(hparams) == top | {"ckpt_path", "test", "params"}
    assert not {"seed", "k_max", "crop", "channels"} & set(hparams["model"])  # ${seed}, ${dataset.k_max}, ...
    assert "data_dir" not in hparams["dataset"] and "save_dir" not in hparams["logger"]["wandb"]

    assert not [s for s in strings(hparams) if os.path.isabs(s)]
    assert hparams["paths"]["data_dir"] == os.path.relpath(data_dir, ROOT)  # the jobs run in ROOT


@pytest.mark.parametrize(
    "choice, last_line", [("logger=none", "best val/nelbo "), ("callbacks=none", "last checkpoint: ")]
)
def test_logger_none_and_callbacks_none_train(data_dir, tmp_path, choice, last_line):
    group = choice.split("=")[0]
    args = [o for o in TINY if not o.startswith(group)] + (["logger=csv"] if group == "callbacks" else [])
    proc = run_cli([*args, choice, *SHORT, f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path}"], tmp_path)
    assert last_line in proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_process_cpu_ddp(data_dir, tmp_path):
    out = tmp_path / "ddp"
    proc = run_cli(
        [
            *TINY,
            "trainer=ddp_cpu",
            *SHORT,
            "trainer.limit_val_batches=2",
            "dataset.batch_size=4",
            f"paths.data_dir={data_dir}",
            f"hydra.run.dir={out}",
        ],
        tmp_path,
    )
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert "val/nelbo" in (out / "csv" / "version_0" / "metrics.csv").read_text()
    assert "Traceback" not in proc.stderr


def test_gradient_clip_val_is_honoured_by_the_manual_step(data_dir, tmp_path):
    """Lightning refuses trainer.gradient_clip_val under manual optimisation; the module clips."""
    import lightning as L

    from fusionvae.training.build import build

    cfg = cfg_for(
        data_dir,
        tmp_path,
        *SHORT,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.gradient_clip_val=0.5",
    )
    datamodule, model, trainer = build(cfg)
    assert trainer.gradient_clip_val is None and model.step_engine.clip == 0.5

    norms = []

    class Clipped(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            norms.append(float(torch.linalg.vector_norm(pl_module.step_engine.flat.grad)))

    trainer.callbacks.append(Clipped())
    trainer.fit(model, datamodule=datamodule)
    assert len(norms) == 2 and all(n == pytest.approx(0.5, rel=1e-4) for n in norms)  # untrained: norms far above 0.5


def test_run_logs_its_config_and_reports_directory_and_best_checkpoint(data_dir, tmp_path, caplog):
    import logging

    import yaml

    with caplog.at_level(logging.INFO, logger="fusionvae"):
        train(cfg_for(data_dir, tmp_path, *SHORT))
    hparams = yaml.safe_load((tmp_path / "csv" / "version_0" / "hparams.yaml").read_text())
    assert hparams["dataset"]["noise_std"] == 0.25 and hparams["dataset"]["n_ellipses"] == 2
    assert hparams["dataset"]["batch_size"] == 8 and hparams["trainer"]["precision"] == "32-true"
    assert hparams["trainer"]["accelerator"] == "CPUAccelerator" and hparams["seed"] == 42
    assert hparams["params"]["total"] == sum(p.numel() for p in instantiate_model(data_dir, tmp_path).parameters())
    text = caplog.text
    assert f"run directory: {tmp_path}" in text
    assert "best val/nelbo " in text and str(tmp_path / "checkpoints" / "epoch000.ckpt") in text
    table = text.splitlines()[-3:]  # the per-K table closes the run: NELBO and the fusion diagnostic
    assert [line.split()[0] for line in table] == ["val/nelbo", "val/kl", "val/prior_sigma"]
    assert all(len(line.split()) == 5 for line in table)  # K = 0 .. 3


def instantiate_model(data_dir, tmp_path):
    from hydra.utils import instantiate

    return instantiate(cfg_for(data_dir, tmp_path, *SHORT).model)


def test_missing_data_dir_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "FUSIONVAE_DATA_DIR": str(tmp_path / "nowhere"), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "train.py", "debug=fdr", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "MNIST file not found" in errors[0] and "FUSIONVAE_DATA_DIR" in errors[0]
