"""scripts/reproduce.py end to end at the smoke budget (two runs of the tiny model): the page holds
the facts, per-K tables with standard errors, findings, plots and grids; a rerun reuses finished
runs and keeps a hand-written discussion."""

from __future__ import annotations

import json
import re
import time

import pytest

from fusionvae.evaluation.report import read_per_item
from scripts import reproduce

pytestmark = pytest.mark.slow


def test_smoke_budget_writes_the_results_page(data_dir, tmp_path):
    argv = ["mnist", "--budget", "smoke", "--runs", "fusionvae,fcn", "--out", str(tmp_path / "docs"),
            "--data-dir", str(data_dir), "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    page = reproduce.main(argv)
    text = page.read_text()
    assert "budget `smoke`" in text and "python scripts/reproduce.py mnist --budget smoke" in text
    evals = tmp_path / "logs/reproduce/smoke/eval"
    assert sorted(p.name for p in evals.iterdir()) == ["fcn_s0", "fusionvae_s0", "fusionvae_s1"]  # seeds per budget
    metrics = json.loads((evals / "fusionvae_s0/metrics.json").read_text())
    assert metrics["items"] == 8 and metrics["eval"]["iw_samples"] == 2 and metrics["classifier_accuracy"] > 0
    row = metrics["per_k"][3]
    assert 0 <= row["class_mean"] <= row["class_best"] <= 1 and row["diversity"] > 0 and row["prior_sigma"] > 0
    items = read_per_item(evals / "fusionvae_s0/per_item.csv")  # per item, every K: the page's pairing data
    assert sorted(items) == [0, 1, 2, 3] and all(len(v) == 8 for v in items[3].values())
    assert sum(items[3]["iw_nll"]) / 8 == pytest.approx(row["iw_nll"], rel=1e-6)
    seeds = [json.loads((evals / f"fusionvae_s{s}/metrics.json").read_text())["per_k"][3]["iw_nll"] for s in (0, 1)]
    assert seeds[0] != seeds[1]  # the seed reached training
    fcn = json.loads((evals / "fcn_s0/metrics.json").read_text())
    assert all(r["diversity"] == 0 for r in fcn["per_k"])  # deterministic: one image per item
    # the fusionvae K=3 IW-NLL cell: the mean over the two seeds ± their standard deviation
    cells = re.search(r"\| fusionvae \(2\) \| 3 \| [^|]+ \| ([\d.]+) ± ([\d.]+) \|", text)
    assert cells and float(cells.group(1)) == pytest.approx(sum(seeds) / 2, abs=0.01)
    assert float(cells.group(2)) == pytest.approx(abs(seeds[0] - seeds[1]) / 2**0.5, abs=0.01)
    assert "| 1→3 |" in text and "### fusionvae minus fcn" in text and "A difference is called clear" in text
    for name in ("mnist_comparison.png", "grid_fusionvae_k1.png", "grid_fcn_k3.png"):
        assert (tmp_path / "docs/results" / name).stat().st_size > 1000
    assert "Stale discussion" not in text and "budget=smoke, runs made at commit" in text
    page.write_text(text.replace("_(not written yet)_", "Our reading of the numbers: 12345.6 nats."))
    start = time.time()
    reproduce.main(argv)
    assert time.time() - start < 30  # finished runs are reused, not retrained
    again = page.read_text()
    assert "Our reading of the numbers" in again and "cites numbers the tables do not hold:** 12345.6" in again


def test_unknown_runs_and_uneven_eval_items_are_refused():
    with pytest.raises(SystemExit, match="unknown run"):
        reproduce.main(["mnist", "--budget", "smoke", "--runs", "fusionvae,nope"])
    with pytest.raises(SystemExit, match="multiple of 8"):
        reproduce.main(["mnist", "--budget", "smoke", "--eval-items", "12"])


@pytest.mark.parametrize("budget", sorted(reproduce.BUDGETS))
def test_every_budget_composes_for_every_run(budget):
    from conftest import compose_cfg

    runs = {**reproduce.RUNS, **reproduce.SKIP_RUNS}
    assert set(dict(reproduce.BUDGETS[budget].seeds)) <= set(runs)
    for name, (_, overrides) in runs.items():
        name_it = [f"task_name=reproduce_{name}", "seed=2"]
        train = [*reproduce.BUDGETS[budget].train, *overrides, *reproduce.QUIET, *name_it]
        cfg = compose_cfg("train", train)
        assert cfg.task_name == f"reproduce_{name}" and cfg.callbacks.progress_bar is None
    if budget == "paper":  # the paper's MNIST run: 400 epochs of batch 800 per device, 2 GPUs
        assert (cfg.trainer.max_epochs, cfg.dataset.batch_size, cfg.trainer.devices) == (400, 800, 2)
    else:
        assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_steps > 0
