"""Short run names (fusionvae.training.run_name): a sweep's job by the keys the sweep varies, a single run by
its overrides without paths, excluded keys and long values, both cut at whole overrides."""

from __future__ import annotations

import pytest
from conftest import compose_cfg
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from fusionvae.training.run_name import distinct_paths, join_capped, run_name, short_value, sweep_keys, varying_items


def hydra_node(task_overrides, sweep_dir=None, extra=()):
    """The ``hydra`` node of a job composed with ``extra`` (e.g. hparams_search=ablation) whose
    command-line overrides were ``task_overrides``; a multirun job when ``sweep_dir`` is given."""
    cfg = compose_cfg("train", list(extra), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task = list(task_overrides)
        if sweep_dir is not None:
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.sweep.dir = str(sweep_dir)
    return cfg.hydra


def test_a_single_run_drops_paths_excluded_keys_housekeeping_and_long_values():
    overrides = [
        "model=cvae",
        "seed=3",
        "paths.data_dir=/data/fusion",
        "ckpt_path=logs/x/last.ckpt",
        "tags=[a,b]",
        "logger=csv",
        "logger.wandb.project=p",
        "dataset.corruption.texture=" + "x" * 30,
        "model/size=tiny",
        "dataset.num_workers=0",  # housekeeping: does not change what the run computes
        "callbacks.progress_bar=null",
    ]
    assert run_name(hydra_node(overrides)) == "model=cvae,seed=3,model/size=tiny"
    assert run_name(hydra_node([])) == ""


def test_a_long_single_run_name_is_cut_at_whole_overrides():
    items = [f"dataset.key_{i}={i}" for i in range(8)]
    name = join_capped(items)
    assert len(name) <= 60 and name.endswith(",+5 more")
    assert name.split(",")[:3] == items[:3]
    assert join_capped(["a=1", "b=2"]) == "a=1,b=2"
    assert join_capped(["k=" + "v" * 80]) == "k=" + "v" * 57 + "…"


def test_a_sweep_job_is_named_by_the_keys_the_sweep_varies(tmp_path):
    sweep = ["seed=1,2", "model=cvae", "trainer.max_epochs=1", f"paths.data_dir={tmp_path}", "x=choice(1)"]
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": sweep}}}), tmp_path / "multirun.yaml")
    job = ["seed=2", "model=cvae", "trainer.max_epochs=1", f"paths.data_dir={tmp_path}", "x=1"]
    assert run_name(hydra_node(job, sweep_dir=tmp_path)) == "seed=2"


def test_a_config_sweep_is_read_from_the_sweeper_params(tmp_path):
    """hparams_search=ablation sweeps model.aggregation and model.res_dist from its config; its
    single-valued model and model.aggregation_level do not vary (no multirun.yaml here)."""
    job = [
        "hparams_search=ablation",
        "model=fusionvae",
        "model.aggregation_level=params",
        "model.aggregation=bayes",
        "model.res_dist=true",
    ]
    node = hydra_node(job, sweep_dir=tmp_path, extra=["hparams_search=ablation"])
    assert run_name(node) == "model.aggregation=bayes,model.res_dist=true"


def test_optuna_values_are_short_and_a_sweep_without_variation_falls_back():
    assert sweep_keys(["a=tag(log, interval(1e-4, 3e-2))", "b=choice(32, 64)", "c=range(1,2)", "d=x"]) == ["a", "b"]
    assert short_value("0.0012345678901") == "0.001235" and short_value("3") == "3"
    assert short_value("x" * 30) == "x" * 23 + "…"


def test_swept_paths_are_shown_by_the_folders_where_they_differ(tmp_path):
    runs = [f"logs/train/multiruns/2026-01-02_03-04-05/{i}/checkpoints/last.ckpt" for i in range(2)]
    assert distinct_paths(runs) == {runs[0]: "…/0/…", runs[1]: "…/1/…"}
    assert distinct_paths(["a/x.ckpt", "a/y.ckpt", None]) == {"a/x.ckpt": "…/x.ckpt", "a/y.ckpt": "…/y.ckpt"}
    assert distinct_paths(["1", "2"]) == {"1": "1", "2": "2"}
    sweep = ["ckpt_path=" + ",".join(runs), "trainer=cpu"]
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": sweep}}}), tmp_path / "multirun.yaml")
    assert run_name(hydra_node([f"ckpt_path={runs[1]}", "trainer=cpu"], sweep_dir=tmp_path)) == "ckpt_path=…/1/…"


def test_varying_items_over_the_finished_jobs():
    jobs = {
        "0": ["model=cvae", "seed=1", "trainer.max_epochs=1"],
        "1": ["model=cvae", "seed=2", "trainer.max_epochs=1"],
        "2": ["model=cvae", "seed=2", "trainer.max_epochs=1", "+extra=1"],
    }
    assert varying_items(jobs) == {"0": ["seed=1"], "1": ["seed=2"], "2": ["seed=2", "extra=1"]}
    same = {"0": ["model=cvae", "paths.data_dir=/d"], "1": ["model=cvae", "paths.data_dir=/d"]}
    assert varying_items(same) == {"0": ["model=cvae"], "1": ["model=cvae"]}


@pytest.mark.parametrize("arg, varies", [("seed=1,2", True), ("seed=1", False), ("s=glob(*)", True)])
def test_sweep_keys(arg, varies):
    assert sweep_keys([arg]) == ([arg.split("=")[0]] if varies else [])
