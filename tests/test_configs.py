"""Every config option composes, alone and inside every experiment, and the more specific config
wins: a model's own keys over its size preset, a size preset over the model defaults, an
experiment over the groups it overrides, a debug config over the experiment."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF, compose_cfg
from omegaconf import OmegaConf

GROUPS = ["dataset", "model", "model/size", "trainer", "logger", "callbacks", "debug", "hparams_search"]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def own_values(path: Path, package: str = "") -> dict[str, object]:
    """The dotted keys a config file sets itself (its defaults list left out), under ``package``."""
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    node.pop("defaults", None)
    flat = {}

    def walk(value, prefix):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = value

    walk(node, package)
    return {k: v for k, v in flat.items() if not k.startswith("hydra")}


def assert_values(cfg, expected: dict[str, object], source: str) -> None:
    for key, want in expected.items():
        if isinstance(want, str) and "${" in want:
            continue  # interpolations are resolved against the composed config
        have = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        have = OmegaConf.to_container(have, resolve=False) if OmegaConf.is_config(have) else have
        assert have == want, f"{key}: {source} sets {want!r} but the composed config has {have!r}"


ALL_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group, option", ALL_OPTIONS)
def test_every_option_composes_and_keeps_its_values(group, option):
    cfg = compose_cfg("train", [f"{group}={option}"])
    if group in ("dataset", "model", "trainer", "callbacks"):
        assert_values(cfg, own_values(CONF / group / f"{option}.yaml", group), f"{group}/{option}.yaml")
    if group == "model/size":
        assert_values(cfg, own_values(CONF / group / f"{option}.yaml", "model"), f"model/size/{option}.yaml")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("group, option", [(g, o) for g, o in ALL_OPTIONS if g not in ("dataset", "model/size")])
def test_experiment_values_win(experiment, group, option):
    cfg = compose_cfg("train", [f"experiment={experiment}", f"{group}={option}"])
    expected = own_values(CONF / "experiment" / f"{experiment}.yaml")
    if group == "debug":
        debug = inherited_values("debug", option)
        expected = {k: v for k, v in expected.items() if k not in debug}
        assert_values(cfg, debug, f"debug/{option}.yaml")
    if group == "model":
        model_keys = inherited_values("model", option, "model", stop="fusionvae")
        assert_values(cfg, {k: v for k, v in model_keys.items() if k not in expected}, f"model/{option}.yaml")
    assert_values(cfg, expected, f"experiment/{experiment}.yaml")


def inherited_values(group: str, option: str, package: str = "", stop: str = "") -> dict[str, object]:
    """Keys a config sets itself or inherits from its parents in the same group (cvae_skip <- cvae,
    debug/fdr <- debug/default), the child winning; ``stop`` (and its parents) left out."""
    if option == stop:
        return {}
    path = CONF / group / f"{option}.yaml"
    parents = [d for d in OmegaConf.load(path).get("defaults", []) if isinstance(d, str) and d != "_self_"]
    values = {}
    for parent in parents:
        values.update(inherited_values(group, parent, package, stop))
    return {**values, **own_values(path, package)}


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("size", options("model/size"))
def test_model_keys_win_over_the_size_preset_and_the_preset_over_defaults(model, size):
    cfg = compose_cfg("train", [f"model={model}", f"model/size={size}"])
    preset = own_values(CONF / "model" / "size" / f"{size}.yaml", "model")
    base = inherited_values("model", model, "model", stop="fusionvae")  # fusionvae.yaml: the defaults
    assert_values(cfg, {k: v for k, v in preset.items() if k not in base}, f"model/size/{size}.yaml")
    assert_values(cfg, base, f"model/{model}.yaml")


def test_tiny_preset_sets_num_mix():
    """Regression: fusionvae.yaml used to override its own size preset (tiny's num_mix: 3 became 10)."""
    assert compose_cfg("train", ["model/size=tiny"]).model.num_mix == 3
    assert compose_cfg("train", []).model.num_mix == 10


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_task_name_is_used(experiment):
    """Regression: train.yaml listed _self_ last, so an experiment's task_name was ignored."""
    import fusionvae.jobs.cli  # noqa: F401 - registers the run-folder resolvers of conf/train.yaml

    with_hydra = compose_cfg("train", [f"experiment={experiment}"], return_hydra_config=True)
    assert with_hydra.task_name == experiment
    assert f"/{experiment}/" in with_hydra.hydra.run.dir.replace("${task_name}", with_hydra.task_name) + "/"


def test_none_options_disable_loggers_and_callbacks():
    from fusionvae.training.build import build_list

    cfg = compose_cfg("train", ["logger=none", "callbacks=none"])
    assert build_list(cfg.logger) == [] and build_list(cfg.callbacks) == []


def test_gradient_accumulation_is_refused_in_one_line_before_any_work():
    from fusionvae.errors import BadInputError
    from fusionvae.training.preflight import check_settings

    cfg = compose_cfg("train", ["+trainer.accumulate_grad_batches=2", "trainer=cpu"])
    with pytest.raises(BadInputError, match=r"accumulate_grad_batches is not supported .* raise dataset.batch_size"):
        check_settings(cfg)
