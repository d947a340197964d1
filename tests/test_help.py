"""``train.py --help`` / ``evaluate.py --help`` answer without importing torch or Lightning (they take
seconds to import; Hydra's help needs only the configs)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_help_imports_neither_torch_nor_lightning(script):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", script, "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "== Configuration groups ==" in proc.stdout, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "hydra" in imported and not {"torch", "lightning"} & imported
    groups = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = dict(line.split(": ", 1) for line in groups.splitlines() if ": " in line)
    # only what a user can choose: shared partials (dataset/_loader, eval/_rgb64) are not options
    assert "mnist" in listed["dataset"].split(", ") and "tiny" in listed["model/size"].split(", ")
    assert not [o for options in listed.values() for o in options.split(", ") if o.startswith("_")]
    assert not [g for g in listed if g.startswith("hydra")]
