"""scripts/collect_results.py: one comparison table from (fake) Hydra training and evaluation runs."""

import csv
import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("collect_results", ROOT / "scripts" / "collect_results.py")
collect_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(collect_results)

METRICS = ("nelbo", "iw_nll", "mse_best", "mse_mean", "psnr_best", "psnr_mean", "ssim_best", "ssim_mean")


def metrics(base):
    """Per-K rows (as evaluate.py writes them) that improve with K; ``base`` shifts the NLLs."""
    return [
        {
            "K": k,
            **{
                m: (base - 10 * k if "nll" in m or "elbo" in m else 0.1 * k + (0.01 if "best" in m else 0))
                for m in METRICS
            },
        }
        for k in range(4)
    ]


def fake_eval_run(job, ckpt, per_k, model, overrides=()):
    """A metrics.json as evaluate.py writes it: model facts, overrides, per-K means and stderrs."""
    job.mkdir(parents=True, exist_ok=True)
    stderr = [{"K": row["K"], **{m: 0.5 for m in METRICS}} for row in per_k]
    data = {
        "ckpt_path": str(ckpt),
        "units": "nats",
        "model": model,
        "overrides": [f"ckpt_path={ckpt}", *overrides],
        "per_k": per_k,
        "stderr": stderr,
    }
    (job / "metrics.json").write_text(json.dumps(data))


FUSIONVAE = {
    "name": "fusionvae",
    "aggregation": "max",
    "skip": "none",
    "res_dist": False,
    "stochastic": True,
    "train_overrides": ["model=fusionvae", "model.skip=none"],
}
CVAE = {
    "name": "cvae",
    "aggregation": "max",
    "skip": "max",
    "res_dist": False,
    "stochastic": True,
    "train_overrides": ["model=cvae", "model.skip=max"],
}
FCN = {"name": "fcn", "aggregation": "mean", "skip": "max", "res_dist": False, "stochastic": False}


@pytest.fixture
def runs(tmp_path):
    evals = tmp_path / "logs" / "evaluate" / "multiruns" / "2026-01-02_00-00-00"
    fake_eval_run(evals / "0", "a.ckpt", metrics(100.0), FUSIONVAE, ["eval.iw_samples=100"])
    fake_eval_run(evals / "1", "b.ckpt", metrics(120.0), CVAE)
    other = tmp_path / "elsewhere"
    fake_eval_run(other / "run", "c.ckpt", metrics(130.0), FCN)
    (evals / "2").mkdir()  # a failed job without metrics
    (evals / "3").mkdir()
    (evals / "3" / "metrics.json").write_text(json.dumps({"ckpt_path": "x", "note": "no per-K metrics"}))
    return tmp_path, evals, other


def test_collect_builds_one_table(runs, monkeypatch):
    tmp_path, evals, other = runs
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report" / "comparison"
    paths = collect_results.main([str(evals), str(other), "--out", str(out)])
    assert set(paths) == {"md", "csv", "png"} and paths["png"].stat().st_size > 1000
    md = paths["md"].read_text().splitlines()
    assert md[0] == "# Comparison (3 runs, mean ± standard error)"
    header = md[2]
    assert header.startswith("| K | model | NELBO (nats) | IW-NLL (nats) | MSE best |") and "units" not in header
    body = [line.split(" | ") for line in md[4:]]
    assert len(body) == 12
    labels = [cells[1] for cells in body]
    assert labels[:3] == ["fusionvae", "cvae skip=max", "fcn skip=max agg=mean"] and labels[3:6] == labels[:3]
    assert [cells[0].strip("| ") for cells in body] == [str(k) for k in range(4) for _ in range(3)]
    assert body[4][2] == "110.00 ± 0.5000" and body[4][3] == "110.00 ± 0.5000"  # cvae, K = 1: NELBO 120 - 10

    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 12
    cvae = [r for r in rows if r["model"] == "cvae"]
    assert [float(r["iw_nll"]) for r in cvae] == [120.0, 110.0, 100.0, 90.0]
    assert cvae[0]["skip"] == "max" and cvae[0]["train_overrides"] == "model=cvae model.skip=max"
    assert cvae[0]["run"] == "logs/evaluate/multiruns/2026-01-02_00-00-00/1"
    fvae = [r for r in rows if r["model"] == "fusionvae"][0]
    assert fvae["eval_overrides"] == "eval.iw_samples=100" and fvae["stochastic"] == "True"
    fcn = [r for r in rows if r["model"] == "fcn"][0]
    assert fcn["aggregation"] == "mean" and fcn["stochastic"] == "False"


def test_duplicate_configurations_are_told_apart(runs, tmp_path):
    _, evals, _ = runs
    again = tmp_path / "again"
    fake_eval_run(again, "d.ckpt", metrics(125.0), CVAE)
    rows, series, errors, units = collect_results.collect([evals, again])
    assert units == "nats" and sorted(series) == ["cvae skip=max", "cvae skip=max [again]", "fusionvae"]


def test_metrics_without_model_facts_are_refused(tmp_path):
    fake_eval_run(tmp_path / "run", "x.ckpt", metrics(1.0), {"aggregation": "max"})
    with pytest.raises(ValueError, match="has no model facts: it was not written by evaluate.py"):
        collect_results.collect([tmp_path])


def test_no_runs_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no metrics.json"):
        collect_results.main([str(tmp_path / "empty"), "--out", str(tmp_path / "c")])
    with pytest.raises(FileNotFoundError, match=r"no such run directory: .*missing"):
        collect_results.main([str(tmp_path / "missing"), "--out", str(tmp_path / "c")])


def test_script_runs_from_the_command_line(runs, tmp_path):
    _, evals, _ = runs
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "collect_results.py"), str(evals), "--out", str(tmp_path / "cli")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 3 | cvae skip=max |" in proc.stdout and (tmp_path / "cli.csv").is_file()
