"""A stop signal during validation is acted on at the end of the current validation batch (a full
validation can outlast SLURM's grace period), with a checkpoint from which the resumed run repeats
that validation and ends bit-identical; Ctrl-C (SIGINT) saves like SIGTERM, exits 130 and says so
in train.log (issue 20, item 4)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fusionvae.errors import Preempted
from fusionvae.jobs.train import train
from fusionvae.training.resilience import stop_outside_training
from tests.conftest import ROOT, compose_cfg
from tests.test_resume import COMMON, assert_same_training_state, best_of

# test_resume's 2 epochs of 4 batches, with 3 validation batches after each epoch
VAL3 = [o for o in COMMON if not o.startswith("trainer.limit_val_batches=")] + ["trainer.limit_val_batches=3"]
IN_VALIDATION = "+callbacks.stop._target_=tests.long_run_helpers.SignalInValidation"


def run_cfg(data_dir, out: Path, *overrides):
    return compose_cfg("train", [*VAL3, f"paths.data_dir={data_dir}", f"paths.output_dir={out}", *overrides])


def val_nelbo(out: Path, version: int) -> dict[int, str]:
    """epoch -> val/nelbo as the CSV logger wrote it (exact text, no rounding)."""
    with open(out / "csv" / f"version_{version}" / "metrics.csv") as f:
        return {int(row["epoch"]): row["val/nelbo"] for row in csv.DictReader(f) if row.get("val/nelbo")}


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight3")
    train(run_cfg(data_dir, out))
    return out


def test_sigterm_in_validation_stops_at_that_batch_and_the_resume_is_bit_identical(data_dir, straight, tmp_path):
    started = tmp_path / "val_batches_started"
    stop = [IN_VALIDATION, "+callbacks.stop.step=4", "+callbacks.stop.batch=0", f"+callbacks.stop.record={started}"]
    with pytest.raises(Preempted) as info:  # in epoch 0's validation (after step 4), at its first batch
        train(run_cfg(data_dir, tmp_path, *stop))
    assert info.value.exit_code == 143 and info.value.step == 4
    assert started.read_text().split() == ["0"]  # batches 1 and 2 never started
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert info.value.path == str(last) and torch.load(last, weights_only=True)["global_step"] == 4
    assert 0 not in val_nelbo(tmp_path, 0)  # that validation did not finish

    train(run_cfg(data_dir, tmp_path, f"ckpt_path={last}"))
    final, reference = torch.load(last, weights_only=True), torch.load(straight / "checkpoints" / "last.ckpt")
    assert_same_training_state(final, reference)
    assert best_of(final) == best_of(reference)
    # the resumed run repeated epoch 0's whole validation: the same value, to the last digit
    assert val_nelbo(tmp_path, 1) == val_nelbo(straight, 0) and len(val_nelbo(straight, 0)) == 2


def test_ctrl_c_in_validation_saves_exits_130_and_says_so_in_train_log(data_dir, tmp_path):
    run, marker, started = tmp_path / "run", tmp_path / "in_validation", tmp_path / "val_batches_started"
    stop = [IN_VALIDATION, "+callbacks.stop.step=4", "+callbacks.stop.batch=1", f"+callbacks.stop.record={started}"]
    wait = ["+callbacks.stop.external=true", f"+callbacks.stop.marker={marker}"]
    args = [*VAL3, "logger=csv", f"paths.data_dir={data_dir}", f"hydra.run.dir={run}", *stop, *wait]
    # SIGINT as a terminal sends it, to a child that does not inherit an ignored SIGINT from the test runner
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert time.monotonic() - sent < 60  # one validation batch and a checkpoint (generous: a busy CPU)
    last = run / "checkpoints" / "last.ckpt"
    line = f"interrupted: stopped by signal 2 at step 4; checkpoint saved to {last} "
    assert err.strip().splitlines()[-1].startswith(line), err[-3000:]
    assert line in (run / "train.log").read_text()
    assert started.read_text().split() == ["1"]  # the batch it came in finished; batch 2 never started
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert not (run / "run.lock").exists()  # released on the way out


def test_a_signal_outside_the_training_loop_stops_at_once_without_a_checkpoint():
    # as in a terminal: a job started in the background by a non-interactive shell (nohup ... &)
    # begins with SIGINT ignored, and stop_outside_training leaves an ignored SIGINT ignored
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(Preempted) as info, stop_outside_training():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # interrupted by the handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
    assert info.value.exit_code == 130 and info.value.prefix == "interrupted" and info.value.path is None
    assert str(info.value) == (
        "stopped by signal 2 before or after the training loop; nothing to save there "
        "(resume from the run's last.ckpt, if it has one)"
    )
