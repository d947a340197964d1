"""Where a default must exist both in Python (signatures, settings classes, dataclasses) and in the
YAML configs, the two copies agree: a value changed in one place and not the other fails here."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from conftest import CONF, compose_cfg
from hydra.utils import get_class
from omegaconf import OmegaConf

from datamodules.base import FusionDataModule
from datamodules.make_celeba import CelebASpec
from datamodules.make_tless import PoolSpec
from datamodules.paste import PasteParams
from fusionvae.evaluation.evaluator import EvalSettings
from fusionvae.model.network_config import NetworkConfig
from fusionvae.model.objective import LossSettings
from fusionvae.training.optim import OptimSettings


def python_defaults(obj) -> dict[str, object]:
    """Keyword defaults of a callable or the field defaults of a dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: f.default for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING}
    return {
        name: p.default
        for name, p in inspect.signature(obj).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def yaml_values(node) -> dict[str, object]:
    """Plain values of a config node (interpolations left out: they are not defaults)."""
    raw = OmegaConf.to_container(node, resolve=False)
    return {k: v for k, v in raw.items() if not (isinstance(v, str) and "${" in v)}


def assert_agree(python: dict, yaml: dict, where: str, rename: dict[str, str] | None = None) -> None:
    rename = rename or {}
    shared = [key for key in python if rename.get(key, key) in yaml]
    assert shared, f"{where}: nothing to compare"
    for key in shared:
        have, want = python[key], yaml[rename.get(key, key)]
        have = list(have) if isinstance(have, tuple) else have
        assert have == want, f"{where}: Python default {key}={have!r} but the config says {want!r}"


def test_network_defaults_are_the_paper_mnist_config():
    model = compose_cfg("train", ["model/size=mnist"]).model
    assert_agree(
        python_defaults(NetworkConfig), yaml_values(model), "NetworkConfig vs model=fusionvae model/size=mnist"
    )


@pytest.mark.parametrize("settings, key", [(OptimSettings, "optim"), (LossSettings, "loss")])
def test_optimiser_and_loss_settings(settings, key):
    node = compose_cfg("train", []).model[key]
    assert set(node) == set(python_defaults(settings)), f"model.{key} keys differ from {settings.__name__}"
    assert_agree(python_defaults(settings), yaml_values(node), f"{settings.__name__} vs model.{key}")


def test_eval_settings():
    node = compose_cfg("evaluate", ["ckpt_path=x", "dataset=mnist"]).eval
    assert set(node) == set(python_defaults(EvalSettings))
    assert_agree(python_defaults(EvalSettings), yaml_values(node), "EvalSettings vs conf/evaluate.yaml (mnist)")


def test_loader_defaults():
    assert_agree(
        python_defaults(FusionDataModule),
        yaml_values(OmegaConf.load(CONF / "dataset" / "_loader.yaml")),
        "FusionDataModule vs conf/dataset/_loader.yaml",
    )


LOADER_KEYS = set(OmegaConf.load(CONF / "dataset" / "_loader.yaml"))


@pytest.mark.parametrize("dataset", sorted(p.stem for p in (CONF / "dataset").glob("[!_]*.yaml")))
def test_datamodule_defaults(dataset):
    """Each datamodule's own defaults equal its config; per-dataset batch sizes live in YAML only."""
    node = compose_cfg("train", [f"dataset={dataset}"]).dataset
    cls = get_class(node._target_)
    own = {k: v for k, v in python_defaults(cls).items() if k not in LOADER_KEYS}
    assert_agree(own, yaml_values(node), f"{cls.__name__} vs conf/dataset/{dataset}.yaml")


def test_celeba_and_tless_generator_specs():
    celeba = yaml_values(compose_cfg("train", ["dataset=celeba"]).dataset)
    assert_agree(python_defaults(CelebASpec), celeba, "CelebASpec vs dataset=celeba", {"seed": "val_seed"})
    tless = yaml_values(compose_cfg("train", ["dataset=tless"]).dataset)
    assert_agree(python_defaults(PasteParams), tless, "PasteParams vs dataset=tless")
    assert_agree(
        python_defaults(PoolSpec), tless, "PoolSpec vs dataset=tless", {"occluder_size": "occluder_source_size"}
    )


@pytest.mark.parametrize("group, settings", [("optim", OptimSettings), ("loss", LossSettings)])
def test_unknown_settings_are_refused_not_ignored(group, settings):
    with pytest.raises(
        ValueError, match=rf"unknown setting\(s\) model\.{group}\.lrr( \(did you mean lr\?\))?; known: "
    ):
        settings.from_dict({"lrr": 1.0}, f"model.{group}")


def test_no_file_cites_a_design_document_outside_the_repository():
    root = CONF.parent
    files = [
        *root.glob("fusionvae/*.py"),
        *root.glob("datamodules/*.py"),
        *root.glob("conf/**/*.yaml"),
        *root.glob("docs/*.md"),
        *root.glob("scripts/*.py"),
        *root.glob("benchmarks/*"),
        root / "README.md",
    ]
    citing = [str(f.relative_to(root)) for f in files if "DESIGN.md" in f.read_text()]
    assert citing == [], f"cite docs/design.md instead: {citing}"
