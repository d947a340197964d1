"""Checkpoints are checked before any data is prepared (issue 20): a SHA-256 beside each checkpoint
written (bytes flipped inside a file that still unzips loaded without a word: evaluate and resume
exited 0), finite weights (NaN weights ran the whole test loop), and the keys a resume needs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch

from fusionvae.errors import CheckpointError
from fusionvae.jobs.evaluate import run_evaluation
from fusionvae.jobs.train import train
from fusionvae.training.checkpoint_io import AtomicCheckpointIO
from fusionvae.training.module import FusionVAEModule
from fusionvae.training.resume import read_checkpoint
from tests.conftest import ROOT, TINY, compose_cfg, save_checkpoint
from tests.test_network import TINY as TINY_NET

WEIGHT = "net.stem.weight"  # any float tensor of the state_dict


def training_checkpoint(path: Path, edit=None) -> Path:
    """A checkpoint as training writes it (through AtomicCheckpointIO, with an optimiser state after
    one step); ``edit(ckpt)`` changes it before it is written."""
    module = FusionVAEModule(**{**TINY_NET, "crop": 2})  # the model the TINY MNIST config resumes
    opt = torch.optim.Adamax(module.parameters())
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    ckpt = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "optimizer_states": [opt.state_dict()],
        "pytorch-lightning_version": L.__version__,
    }
    if edit is not None:
        edit(ckpt)
    AtomicCheckpointIO().save_checkpoint(ckpt, path)
    return path


def flip_low_byte(path: Path) -> None:
    """Flip the lowest byte of the first value of the largest tensor (a float32 weight): the file
    still unzips and the value stays finite (a mantissa bit of a little-endian float)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))


def _damaged(tmp_path: Path) -> Path:
    ckpt = training_checkpoint(tmp_path / "run" / "last.ckpt")
    before = torch.load(ckpt, weights_only=True)["state_dict"]
    flip_low_byte(ckpt)
    after = torch.load(ckpt, weights_only=True)["state_dict"]  # loads without a word
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    return ckpt


def _train_cfg(tmp_path: Path, ckpt: Path):
    # no MNIST in data_dir: any data work would raise FileNotFoundError instead of the expected error
    return compose_cfg(
        "train",
        [*TINY, f"paths.data_dir={tmp_path / 'no_data'}", f"paths.output_dir={tmp_path}/out", f"ckpt_path={ckpt}"],
    )


def _eval_cfg(tmp_path: Path, ckpt: Path):
    dataset = [o for o in TINY if o.startswith("dataset.")]
    paths = [f"paths.data_dir={tmp_path / 'no_data'}", f"paths.output_dir={tmp_path}/eval"]
    return compose_cfg("evaluate", [*dataset, *paths, f"ckpt_path={ckpt}"])


def mismatch(ckpt: Path) -> str:
    return (
        f"checkpoint {ckpt} does not match its checksum last.ckpt.sha256: its bytes changed after it was "
        f"written (damaged disk or copy); use another checkpoint (e.g. an epoch*.ckpt beside it)"
    )


def nonfinite(ckpt: Path, count: int, first: str) -> str:
    return (
        f"checkpoint {ckpt} holds NaN or inf in {count} tensor(s) (first: {first}): the run diverged before it "
        f"was saved, or the file is damaged; use an earlier checkpoint (e.g. an epoch*.ckpt beside it)"
    )


# ---- checksum -----------------------------------------------------------------------------------
def test_each_checkpoint_written_gets_its_sha256_beside_it(tmp_path: Path):
    ckpt = training_checkpoint(tmp_path / "epoch003.ckpt")
    sums = tmp_path / "epoch003.ckpt.sha256"
    assert sums.read_text() == f"{hashlib.sha256(ckpt.read_bytes()).hexdigest()}  epoch003.ckpt\n"  # sha256sum -c
    AtomicCheckpointIO().remove_checkpoint(ckpt)  # ModelCheckpoint dropping an older best: both go
    assert os.listdir(tmp_path) == []


def test_flipped_bytes_are_refused_by_evaluate_and_resume_before_any_data_work(tmp_path: Path):
    ckpt = _damaged(tmp_path)
    for run in (lambda: read_checkpoint(ckpt), lambda: train(_train_cfg(tmp_path, ckpt))):
        with pytest.raises(CheckpointError) as info:
            run()
        assert str(info.value) == mismatch(ckpt)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        run_evaluation(_eval_cfg(tmp_path, ckpt))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        AtomicCheckpointIO().load_checkpoint(ckpt)  # Lightning's own loads (SLURM requeue, best for test)
    assert not (tmp_path / "out").exists() and not (tmp_path / "eval").exists()


def test_a_checkpoint_without_a_checksum_file_still_loads(tmp_path: Path):
    old = save_checkpoint(FusionVAEModule(**TINY_NET), tmp_path / "old.ckpt")  # torch.save: no .sha256
    assert sorted(read_checkpoint(old)) == ["hyper_parameters", "pytorch-lightning_version", "state_dict"]


def test_cli_evaluate_gives_one_line_and_exit_1(tmp_path: Path):
    ckpt = _damaged(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FUSIONVAE_DATA_DIR": str(tmp_path / "no_data")}
    env.pop("HYDRA_FULL_ERROR", None)
    args = [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}"]
    proc = subprocess.run(
        [sys.executable, "evaluate.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [f"error: {mismatch(ckpt)}"]


# ---- finite weights and the keys a resume needs --------------------------------------------------
def _nan_weight(ckpt: dict) -> None:
    ckpt["state_dict"][WEIGHT] = ckpt["state_dict"][WEIGHT].clone().index_fill_(0, torch.tensor([0]), float("nan"))


def test_nan_weights_are_refused_before_any_data_work(tmp_path: Path):
    ckpt = training_checkpoint(tmp_path / "last.ckpt", _nan_weight)
    message = nonfinite(ckpt, 1, f"state_dict.{WEIGHT}")
    for run in (lambda: run_evaluation(_eval_cfg(tmp_path, ckpt)), lambda: train(_train_cfg(tmp_path, ckpt))):
        with pytest.raises(CheckpointError) as info:
            run()
        assert str(info.value) == message


def test_resume_needs_a_finite_optimiser_state(tmp_path: Path):
    def no_optimizer(ckpt: dict) -> None:
        del ckpt["optimizer_states"]

    def inf_moment(ckpt: dict) -> None:
        ckpt["optimizer_states"][0]["state"][0]["exp_inf"].fill_(float("inf"))

    weights_only = training_checkpoint(tmp_path / "a" / "last.ckpt", no_optimizer)
    assert "state_dict" in read_checkpoint(weights_only)  # evaluating it is fine
    with pytest.raises(CheckpointError) as info:
        train(_train_cfg(tmp_path, weights_only))
    assert str(info.value) == (
        f"checkpoint {weights_only} holds no optimizer_states (saved with weights only): it can be evaluated, "
        f"not resumed; resume from a last.ckpt or epoch*.ckpt written by train.py, or train anew without ckpt_path"
    )
    diverged = training_checkpoint(tmp_path / "b" / "last.ckpt", inf_moment)
    with pytest.raises(CheckpointError) as info:
        train(_train_cfg(tmp_path, diverged))
    assert str(info.value) == nonfinite(diverged, 1, "optimizer_states.0.state.0.exp_inf")


def test_a_checkpoint_without_state_dict_is_refused_in_one_line(tmp_path: Path):
    ckpt = training_checkpoint(tmp_path / "last.ckpt", lambda c: c.pop("state_dict"))
    with pytest.raises(CheckpointError) as info:
        run_evaluation(_eval_cfg(tmp_path, ckpt))
    assert str(info.value) == (
        f"checkpoint {ckpt} has no state_dict: it is not a FusionVAE training checkpoint; "
        f"use one written by train.py (<run dir>/checkpoints/*.ckpt)"
    )
