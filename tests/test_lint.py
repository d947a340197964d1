"""The ruff configuration in pyproject.toml (lint + format) holds for the whole repository."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import ROOT


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or pytest.fail("ruff is missing: python -m pip install -e '.[dev]'")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("args", [("check", "."), ("format", "--check", ".")], ids=["lint", "format"])
def test_ruff_is_clean(args):
    out = ruff(*args)
    assert out.returncode == 0, (
        f"ruff {' '.join(args)} (fix: ruff check --fix . && ruff format .):\n{out.stdout[-3000:]}"
    )
