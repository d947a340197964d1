"""The layering of ``fusionvae/`` (docs/design.md, "Code") is enforced by the import-linter contracts
in pyproject.toml: this runs them, and shows they catch a planted upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

LINT = [sys.executable, "-c", "import sys, importlinter.cli as c; sys.exit(c.lint_imports_command())"]


def lint(where: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(where)}
    return subprocess.run(LINT, cwd=where, env=env, capture_output=True, text=True, timeout=120)


def test_the_contracts_hold():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in proc.stdout


def test_an_upward_import_breaks_the_layers(tmp_path: Path):
    for name in ("fusionvae", "datamodules"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "conf"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    layers = tmp_path / "fusionvae" / "model" / "layers.py"
    layers.write_text(layers.read_text() + "\nfrom fusionvae.jobs import cli  # noqa: E402 - planted\n")
    data = tmp_path / "datamodules" / "base.py"
    data.write_text(data.read_text() + "\nimport fusionvae.errors  # noqa: E402 - planted\n")
    proc = lint(tmp_path)
    assert proc.returncode == 1
    assert "fusionvae.model.layers -> fusionvae.jobs.cli" in proc.stdout
    assert "datamodules.base -> fusionvae.errors" in proc.stdout
    assert "Contracts: 0 kept, 3 broken." in proc.stdout  # the model now reaches omegaconf through jobs too
