"""W&B run identity: a short name from the overrides (more in tests/test_run_names.py), one group
per sweep, the top-level tags, explicit config values kept, and the W&B id of a resumed run."""

from __future__ import annotations

import pytest
from conftest import compose_cfg
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from fusionvae.training.build import build_list, wandb_identity


@pytest.fixture
def hydra_cfg():
    def make(overrides, multirun_dir=None):
        cfg = compose_cfg("train", ["logger=wandb", *overrides], return_hydra_config=True)
        if multirun_dir:
            with open_dict(cfg):
                cfg.hydra.mode = RunMode.MULTIRUN
                cfg.hydra.sweep.dir = multirun_dir
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield make
    HydraConfig.instance().cfg = None


def wandb_init(cfg, wandb_id=None) -> dict:
    (logger,) = build_list(cfg.logger, wandb_identity(cfg, wandb_id))
    return logger._wandb_init


def test_name_is_the_overrides_group_the_task_and_tags_are_passed(hydra_cfg, tmp_path):
    cfg = hydra_cfg(["model=cvae", "seed=3", "tags=[baseline,mnist]", "ckpt_path=null", f"paths.log_dir={tmp_path}"])
    got = wandb_init(cfg)
    assert got["name"] == "model=cvae,seed=3"  # ckpt_path, tags, logger and paths left out, in command-line order
    assert got["group"] == "train" and list(got["tags"]) == ["baseline", "mnist"]
    assert "id" not in got or got["id"] is None


def test_a_sweep_is_one_group_and_run_name_or_explicit_values_win(hydra_cfg):
    cfg = hydra_cfg(["run_name=mine"], multirun_dir="/x/multiruns/2026-01-02_03-04-05")
    got = wandb_init(cfg)
    assert (got["name"], got["group"]) == ("mine", "train-2026-01-02_03-04-05")
    cfg = hydra_cfg(["logger.wandb.group=g", "logger.wandb.name=n", "task_name=abl"], multirun_dir="/x/s")
    got = wandb_init(cfg)
    assert (got["name"], got["group"]) == ("n", "g")


def test_no_overrides_gives_the_task_name_and_resume_keeps_the_id(hydra_cfg):
    cfg = hydra_cfg([])
    assert wandb_identity(cfg) == {"name": "train", "group": "train"}
    got = wandb_init(cfg, "abc123")
    assert got["id"] == "abc123" and got["resume"] == "allow" and got["name"] == "train"


def test_failures_reach_the_run_log_file_and_the_console_gets_one_line(tmp_path, capsys, monkeypatch):
    import logging

    from fusionvae.errors import BadInputError
    from fusionvae.jobs.reporting import reported

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    handler, root = logging.FileHandler(tmp_path / "train.log"), logging.getLogger()
    root.addHandler(handler)
    try:
        with pytest.raises(SystemExit), reported():
            raise BadInputError("model.num_mix must be >= 1")
        with pytest.raises(ZeroDivisionError), reported():
            print(1 / 0)
    finally:
        root.removeHandler(handler)
        handler.close()
    text = (tmp_path / "train.log").read_text()
    assert "error: model.num_mix must be >= 1" in text and "ZeroDivisionError: division by zero" in text
    assert capsys.readouterr().err.strip().splitlines() == ["error: model.num_mix must be >= 1"]
