"""A plain ``pip install .`` trains and evaluates from any directory: the wheel holds every config
under ``fusionvae/conf`` and the code, declares the console scripts, and the installed mains load
the packaged configs, which compose to the same configs as the checkout's ``conf/``."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

# what the build reads; copied so that a stale build/ folder in the checkout cannot leak into it
BUILD_INPUTS = ["pyproject.toml", "README.md", "LICENSE", "fusionvae", "datamodules", "conf"]
SCRIPTS = {
    "fusionvae-train": "fusionvae.jobs.cli:train_main",
    "fusionvae-evaluate": "fusionvae.jobs.cli:evaluate_main",
    "fusionvae-fuse": "fusionvae.jobs.fuse:console_main",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    # no isolation: the installed setuptools builds it, no network needed
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (found,) = out.glob("fusionvae-*.whl")
    return found


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(where)
    return where


def test_every_config_is_packaged_under_fusionvae_conf(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"fusionvae/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert configs and configs <= names, f"missing from the wheel: {sorted(configs - names)}"
    assert {n for n in names if n.startswith("fusionvae/conf/")} == configs


def test_every_module_is_in_the_wheel(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        p.relative_to(ROOT).as_posix()
        for pkg in ("fusionvae", "datamodules")
        for p in (ROOT / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert modules <= names, f"missing from the wheel (list new packages in pyproject.toml): {sorted(modules - names)}"


def test_console_scripts_are_declared_and_exist(wheel):
    zf = zipfile.ZipFile(wheel)
    (entry_points,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(zf.read(entry_points).decode())
    assert dict(parser["console_scripts"]) == SCRIPTS
    import fusionvae.jobs.cli

    assert callable(fusionvae.jobs.cli.train_main) and callable(fusionvae.jobs.cli.evaluate_main)
    import fusionvae.jobs.fuse

    assert callable(fusionvae.jobs.fuse.console_main)
    assert fusionvae.jobs.cli.CONF == CONF  # in a checkout: its one conf/


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("train", []),
        ("train", ["model/size=tiny", "trainer=cpu", "debug=fdr"]),
        ("train", ["experiment=celeba_paper", "hparams_search=ablation"]),
        ("evaluate", ["ckpt_path=x.ckpt", "dataset=tless"]),
    ],
)
def test_packaged_configs_compose_as_the_checkout(unpacked, name, overrides):
    def composed(conf_dir: Path) -> dict:
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            return OmegaConf.to_container(compose(name, overrides=overrides), resolve=False)

    assert composed(unpacked / "fusionvae" / "conf") == composed(CONF)


def test_installed_main_loads_the_packaged_configs(unpacked, tmp_path):
    """The wheel's own ``train_main`` (not the checkout's) run from an empty folder prints its config."""
    code = (
        "import sys, fusionvae.jobs.cli as c; print(c.CONF, file=sys.stderr); "
        "sys.argv = ['fusionvae-train', '--cfg', 'job', 'model/size=tiny']; c.train_main()"
    )
    env = {**os.environ, "PYTHONPATH": str(unpacked), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert str(unpacked / "fusionvae" / "conf") in proc.stderr.splitlines()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        want = OmegaConf.to_container(compose("train", overrides=["model/size=tiny"]), resolve=False)
    assert yaml.safe_load(proc.stdout) == want
    assert not any(tmp_path.iterdir())  # --cfg writes nothing


def test_installed_fuse_script_fuses_a_scene_folder(wheel, tmp_path):
    """``fusionvae-fuse <scene folder> --ckpt ...`` from the wheel installed in a fresh folder."""
    import torch
    from conftest import save_checkpoint
    from test_evaluation import tiny_module

    from datamodules.demo_images import write_scenes

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    torch.manual_seed(0)
    ckpt = save_checkpoint(tiny_module(), tmp_path / "last.ckpt")
    (scene,) = write_scenes(tmp_path / "scenes", 1, 32, grey=True)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    script = [str(site / "bin" / "fusionvae-fuse"), "--ckpt", str(ckpt), "--out", "grid.png", "--samples", "2"]
    proc = subprocess.run(
        [*script, "--samples-dir", "samples", str(scene)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "grid.png").is_file() and len(list((tmp_path / "samples").glob("*.png"))) == 3
    where = [sys.executable, "-c", "import fusionvae.jobs.fuse as f; print(f.__file__)"]
    imported = subprocess.run(where, cwd=tmp_path, env=env, capture_output=True, text=True).stdout.strip()
    assert Path(imported).is_relative_to(site)  # the installed package, not the checkout
