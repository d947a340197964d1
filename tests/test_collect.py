"""scripts/collect_results.py: one comparison table from (fake) Hydra training and evaluation runs."""
import csv
import importlib.util
import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("collect_results", ROOT / "scripts" / "collect_results.py")
collect_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(collect_results)

METRICS = ("nelbo", "iw_nll", "mse_best", "mse_mean", "psnr_best", "psnr_mean", "ssim_best", "ssim_mean")


def write_yaml(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))


def fake_train_run(job, model_choice, overrides):
    write_yaml(job / ".hydra" / "overrides.yaml", overrides)
    write_yaml(job / ".hydra" / "hydra.yaml", {"hydra": {"runtime": {"choices": {"model": model_choice, "dataset": "mnist"}}}})
    (job / "checkpoints").mkdir(parents=True, exist_ok=True)
    return job / "checkpoints" / "last.ckpt"


def metrics(base):
    """Per-K metrics that improve with K; ``base`` shifts the NLLs."""
    return {f"test/{m}_k{k}": (base - 10 * k if "nll" in m or "elbo" in m else 0.1 * k + (0.01 if "best" in m else 0))
            for m in METRICS for k in range(4)}


def fake_eval_run(job, ckpt, results, model=None, overrides=None, config=None):
    job.mkdir(parents=True, exist_ok=True)
    data = {"ckpt_path": str(ckpt), "units": "nats", **results}
    if model is not None:
        data["model"] = model
    (job / "metrics.json").write_text(json.dumps(data))
    write_yaml(job / ".hydra" / "overrides.yaml", overrides or [f"ckpt_path={ckpt}"])
    if config is not None:
        write_yaml(job / ".hydra" / "config.yaml", config)


@pytest.fixture
def runs(tmp_path):
    train = tmp_path / "logs" / "train" / "multiruns" / "2026-01-01_00-00-00"
    ck_fvae = fake_train_run(train / "0", "fusionvae", ["model=fusionvae", "model.skip=none"])
    ck_cvae = fake_train_run(train / "1", "cvae", ["model=cvae", "model.skip=max"])
    evals = tmp_path / "logs" / "evaluate" / "multiruns" / "2026-01-02_00-00-00"
    # as evaluate.py writes it: the model facts inside metrics.json
    fake_eval_run(evals / "0", ck_fvae, metrics(100.0),
                  model={"name": "fusionvae", "aggregation": "max", "skip": "none", "res_dist": False, "stochastic": True,
                         "train_overrides": ["model=fusionvae", "model.skip=none"]},
                  overrides=[f"ckpt_path={ck_fvae}", "eval.iw_samples=100"])
    # only per-K metrics: described through the training run behind ckpt_path
    fake_eval_run(evals / "1", ck_cvae, metrics(120.0))
    # a run without a training dir: described by its own config.yaml and overrides
    other = tmp_path / "elsewhere"
    fake_eval_run(other / "run", tmp_path / "gone.ckpt", metrics(130.0),
                  overrides=["model.skip=max"], config={"model": {"stochastic": False, "aggregation": "mean"}})
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
    assert md[0] == "# Comparison (3 runs)"
    header = md[2]
    assert header.startswith("| K | model | NELBO (nats) | IW-NLL (nats) | MSE best |") and "units" not in header
    body = [line.split(" | ") for line in md[4:]]
    assert len(body) == 12
    labels = [cells[1] for cells in body]
    assert labels[:3] == ["fusionvae", "cvae skip=max", "fcn skip=max agg=mean"] and labels[3:6] == labels[:3]
    assert [cells[0].strip("| ") for cells in body] == [str(k) for k in range(4) for _ in range(3)]
    assert body[4][2] == "110.00" and body[4][3] == "110.00"  # cvae, K = 1: NELBO 120 - 10

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
    fake_eval_run(again, json.loads((evals / "1" / "metrics.json").read_text())["ckpt_path"], metrics(125.0))
    rows, series, units = collect_results.collect([evals, again])
    assert units == "nats" and sorted(series) == ["cvae skip=max", "cvae skip=max [again]", "fusionvae"]


def test_no_runs_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no metrics.json"):
        collect_results.main([str(tmp_path / "empty"), "--out", str(tmp_path / "c")])
    with pytest.raises(FileNotFoundError, match=r"no such run directory: .*missing"):
        collect_results.main([str(tmp_path / "missing"), "--out", str(tmp_path / "c")])


def test_script_runs_from_the_command_line(runs, tmp_path):
    _, evals, _ = runs
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "collect_results.py"), str(evals), "--out",
                           str(tmp_path / "cli")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 3 | cvae skip=max |" in proc.stdout and (tmp_path / "cli.csv").is_file()
