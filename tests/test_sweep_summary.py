"""The table that ends a sweep (fusionvae.jobs.sweep_summary) from job folders as training leaves them:
result.json (finished), a CSV log only (stopped), an error line in train.log (failed). The real
two-job sweep is tests/test_train.py::test_multirun_sweep_gives_one_wandb_run_per_job."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from types import SimpleNamespace

from conftest import ROOT
from omegaconf import OmegaConf

from fusionvae.jobs.sweep_summary import SweepSummary, write_summary


def job(sweep, num, overrides, result=None, metrics_csv=None, log=""):
    folder = sweep / str(num)
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")
    if result is not None:
        (folder / "result.json").write_text(json.dumps(result))
    if metrics_csv is not None:
        (folder / "csv" / "version_0").mkdir(parents=True)
        (folder / "csv" / "version_0" / "metrics.csv").write_text(metrics_csv)
    (folder / "train.log").write_text(log)
    return folder


def result(best, per_k):
    last = {f"val/nelbo_k{k}": v for k, v in enumerate(per_k)}
    return {"best": {"monitor": "val/nelbo", "score": best, "checkpoint": "checkpoints/epoch000.ckpt"}, "last": last}


def test_one_row_per_job_with_its_varying_overrides_best_and_per_k(tmp_path):
    common = ["trainer.max_epochs=1", f"paths.data_dir={tmp_path}"]
    job(tmp_path, 0, ["seed=1", *common], result(101.5, [120.0, 100.0]))
    job(tmp_path, 1, ["seed=2", *common], result(99.25, [119.0, 98.0]))
    stopped = "epoch,step,val/nelbo,val/nelbo_k0,val/nelbo_k1\n0,9,105.0,121.0,104.0\n1,19,103.0,118.0,102.0\n"
    job(tmp_path, 2, ["seed=3", *common], metrics_csv=stopped)
    failed = "[2026-01-01 00:00:00,000][fusionvae][ERROR] - error: model.num_mix must be >= 1\n"
    job(tmp_path, 10, ["seed=4", *common], log=failed)
    text = write_summary(tmp_path)
    assert (tmp_path / "summary.md").read_text() == text
    lines = text.splitlines()
    assert lines[0] == f"# Sweep {tmp_path.name}: 4 jobs"
    assert lines[2] == "| job | overrides | best val/nelbo | val/nelbo_k0 | val/nelbo_k1 | status |"
    assert lines[4:8] == [
        "| 0 | seed=1 | 101.50 | 120.00 | 100.00 | done |",
        "| 1 | seed=2 | 99.25 | 119.00 | 98.00 | done |",
        "| 2 | seed=3 | 103.00 | 118.00 | 102.00 | stopped (no result.json) |",
        "| 10 | seed=4 |  |  |  | error: model.num_mix must be >= 1 |",
    ]
    assert lines[-1] == "lowest best val/nelbo: job 1 (seed=2) 99.2500"
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"] and rows[1]["best val/nelbo"] == "99.25"


def test_the_callback_writes_at_the_end_and_once_at_exit_when_the_sweep_stopped(tmp_path, capsys):
    job(tmp_path, 0, ["seed=1"], result(1.0, [2.0]))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    callback = SweepSummary()
    callback.on_multirun_start(config)
    callback._at_exit()  # the process ends before on_multirun_end (a job failed)
    assert "the sweep stopped early" in capsys.readouterr().out and (tmp_path / "summary.md").is_file()
    (tmp_path / "summary.md").unlink()
    callback._at_exit()  # once
    assert not (tmp_path / "summary.md").exists()
    callback.on_multirun_start(config)
    callback.on_multirun_end(config)
    callback._at_exit()
    assert capsys.readouterr().out.count("| 0 | seed=1 |") == 1


def test_hydra_loads_the_callback_without_torch():
    """The callback is in conf/hydra/default.yaml; instantiating it (as Hydra does at start) imports
    neither torch nor Lightning."""
    code = (
        "import sys; from hydra.utils import instantiate; from omegaconf import OmegaConf;"
        "cfg = OmegaConf.load('conf/hydra/default.yaml');"
        "instantiate(cfg.callbacks.sweep_summary);"
        "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_job_result_is_written_at_the_end_of_training(tmp_path):
    from fusionvae.training.run_log import write_result

    callback = SimpleNamespace(
        monitor="val/nelbo", best_model_score=1.5, best_model_path=str(tmp_path / "checkpoints" / "e.ckpt")
    )
    trainer = SimpleNamespace(
        default_root_dir=str(tmp_path),
        checkpoint_callback=callback,
        global_step=7,
        callback_metrics={"val/nelbo_k0": 2.0, "train/nelbo": 3.0, "val/nelbo": 1.75},
    )
    got = json.loads(write_result(trainer).read_text())
    assert got == {
        "best": {"monitor": "val/nelbo", "score": 1.5, "checkpoint": "checkpoints/e.ckpt"},
        "global_step": 7,
        "last": {"val/nelbo": 1.75, "val/nelbo_k0": 2.0},
    }


def test_an_evaluation_sweep_lists_the_evaluated_nelbo_per_k(tmp_path):
    folder = job(tmp_path, 0, ["ckpt_path=runs/0/checkpoints/last.ckpt"])
    job(tmp_path, 1, ["ckpt_path=runs/1/checkpoints/last.ckpt"])
    per_k = [{"K": 0, "nelbo": 90.0, "iw_nll": 80.0}, {"K": 1, "nelbo": 70.0}]
    (folder / "metrics.json").write_text(json.dumps({"per_k": per_k}))
    lines = write_summary(tmp_path).splitlines()
    assert lines[2] == "| job | overrides | nelbo_k0 | nelbo_k1 | status |"
    assert lines[4:6] == [
        "| 0 | ckpt_path=…/0/… | 90.00 | 70.00 | done |",
        "| 1 | ckpt_path=…/1/… |  |  | no result |",
    ]
