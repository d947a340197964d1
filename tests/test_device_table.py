"""benchmarks/device_check.sh: its shell syntax, the refusal without a GPU, and its markdown table
(scripts/device_table.py) on sample records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from scripts.device_table import read_records, table
from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def result(batch, k, ips, ms, compile_=False):
    return {
        "dataset": "FusionMNISTDataModule",
        "params_m": 0.4,
        "batch": batch,
        "k": k,
        "device": "cuda",
        "precision": "bf16",
        "threads": 16,
        "images_per_s": ips,
        "ms_per_step": ms,
        "peak_mib": 812,
        "peak_kind": "cuda",
        "ops_per_step": 900 if compile_ else 11415,
        "kernel_ops_per_step": 800 if compile_ else 7000,
    }


def test_table_from_records():
    lines = [
        "some log line",
        json.dumps(
            {
                "label": "pytest -m gpu",
                "compile": False,
                "status": "ok: 5 passed, 1 skipped",
                "seconds": 80,
                "result": None,
            }
        ),
        json.dumps(
            {
                "label": "MNIST b64",
                "compile": False,
                "status": "ok",
                "seconds": 15,
                "result": result(64, 3, 1000.0, 64.0),
            }
        ),
        json.dumps(
            {
                "label": "MNIST b64",
                "compile": True,
                "status": "ok",
                "seconds": 70,
                "result": result(64, 3, 2500.0, 25.6, True),
            }
        ),
        json.dumps(
            {"label": "CelebA-size K=0", "compile": True, "status": "timeout (120 s)", "seconds": 120, "result": None}
        ),
        json.dumps(
            {
                "label": "CelebA-size K=3",
                "compile": True,
                "status": "skipped (time budget)",
                "seconds": 0,
                "result": None,
            }
        ),
        "{not json",
    ]
    records = read_records(lines)
    assert [r["label"] for r in records] == [
        "pytest -m gpu",
        "MNIST b64",
        "MNIST b64",
        "CelebA-size K=0",
        "CelebA-size K=3",
    ]
    text = table(records, "H100, torch 2.11")
    rows = text.splitlines()
    assert rows[0] == "**H100, torch 2.11**" and rows[2].startswith("| run | compile | batch | K |")
    assert len(rows) == 4 + len(records) and all(r.count("|") == 13 for r in rows[2:])
    assert "| MNIST b64 | no | 64 | 3 | bf16 | 1,000.0 | 64.0 | 812 | 11,415 (7,000) | – | 15 | ok |" in rows
    assert "| MNIST b64 | yes | 64 | 3 | bf16 | 2,500.0 | 25.6 | 812 | 900 (800) | 2.50x | 70 | ok |" in rows
    assert rows[-2].endswith("| timeout (120 s) |") and rows[-1].endswith("| skipped (time budget) |")


def test_random_k_is_labelled_and_kernel_ops_are_optional():
    res = result(64, None, 10.0, 1.0)
    del res["kernel_ops_per_step"]  # an older throughput.py
    record = {"label": "MNIST", "compile": False, "status": "ok", "seconds": 1, "result": res}
    assert "| MNIST | no | 64 | random | bf16 | 10.0 | 1.0 | 812 | 11,415 | – | 1 | ok |" in table([record])


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_device_check_script_syntax_and_refusal_without_a_gpu(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the script would run")
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OUT": str(tmp_path / "out")},
    )
    assert proc.returncode == 3
    assert "no CUDA device" in proc.stderr and "--cpu-dry-run" in proc.stderr
    assert not (tmp_path / "out").exists()  # it stops before doing anything
