"""One training job per run folder (issue 20, item 2): a second job for a folder in use is refused
in one line before it writes anything; a lock whose writer has ended is taken over; the lock goes
when the job ends, also after an error or a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datamodules.tempfiles import HOST
from fusionvae.errors import RunFolderInUseError
from fusionvae.training import run_lock as lock_module
from fusionvae.training.run_lock import LOCK_NAME, acquire, release, run_lock
from tests.conftest import ROOT, TINY


def write_lock(folder: Path, **fields) -> Path:
    holder = {"pid": 1, "host": HOST, "started": "2024-01-02 03:04:05", "process": None, **fields}
    (folder / LOCK_NAME).write_text(json.dumps(holder))
    return folder / LOCK_NAME


@pytest.fixture
def sleeper():
    """A live process on this host that is not us."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)


# ---- the rules ------------------------------------------------------------------------------------
def test_the_lock_names_this_process_and_goes_at_the_end_also_after_an_error(tmp_path):
    with pytest.raises(KeyError), run_lock(tmp_path) as path:
        holder = json.loads(path.read_text())
        assert (holder["pid"], holder["host"]) == (os.getpid(), HOST) and holder["started"]
        raise KeyError("a failing run")
    assert os.listdir(tmp_path) == []  # lock and its temporary gone


def test_a_live_writer_on_this_host_is_refused_in_one_line(tmp_path, sleeper):
    path = write_lock(tmp_path, pid=sleeper, process=lock_module._identity(sleeper))
    with pytest.raises(RunFolderInUseError) as info:
        acquire(tmp_path)
    assert str(info.value) == (
        f"run folder {tmp_path} is in use by training process {sleeper}@{HOST} (started 2024-01-02 03:04:05): "
        f"two jobs in one folder overwrite each other's checkpoints; wait for it to end or stop it "
        f"(kill -TERM {sleeper} saves and exits), then resume"
    )
    assert json.loads(path.read_text())["pid"] == sleeper  # untouched


@pytest.mark.parametrize("how", ["dead pid", "pid now another process's", "our pid, a former process"])
def test_a_lock_whose_writer_has_ended_is_taken_over(tmp_path, sleeper, how, caplog):
    pid, process = {
        "dead pid": (dead_pid(), None),
        "pid now another process's": (sleeper, "another-boot:12345"),
        "our pid, a former process": (os.getpid(), None),
    }[how]
    path = write_lock(tmp_path, pid=pid, process=process)
    assert acquire(tmp_path) == path and json.loads(path.read_text())["pid"] == os.getpid()
    assert f"took over {path} from {pid}@{HOST}, which has ended" in caplog.text
    release(path)
    assert not path.exists()


def test_a_writer_on_another_host_is_refused_with_how_to_remove_its_lock(tmp_path):
    path = write_lock(tmp_path, pid=4242, host="node-17")
    with pytest.raises(RunFolderInUseError) as info:
        acquire(tmp_path)
    assert str(info.value) == (
        f"run folder {tmp_path} is in use by training process 4242@node-17 (started 2024-01-02 03:04:05), "
        f"which cannot be checked from {HOST}: if that job is really gone, delete {path} and start again; "
        f"else wait for it to end or stop it"
    )


def test_a_requeued_slurm_job_takes_over_its_earlier_run_from_another_host(tmp_path, monkeypatch):
    write_lock(tmp_path, pid=4242, host="node-17", slurm_job="998", slurm_step="0", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "998")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    release(acquire(tmp_path))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same run of the job: another job step, refused
    write_lock(tmp_path, pid=4242, host="node-17", slurm_job="998", slurm_step="1", slurm_restart=0)
    with pytest.raises(RunFolderInUseError):
        acquire(tmp_path)


def test_other_ranks_take_no_lock_and_refuse_only_what_rank_zero_refuses(tmp_path, sleeper, monkeypatch):
    path = write_lock(tmp_path, pid=sleeper, process=lock_module._identity(sleeper))
    with run_lock(tmp_path, rank_zero=False):  # started by Lightning: rank zero's lock is the holder
        pass
    monkeypatch.setenv("SLURM_JOB_ID", "998")  # started by srun like rank zero: a stranger's lock is refused
    with pytest.raises(RunFolderInUseError), run_lock(tmp_path, rank_zero=False):
        pass
    write_lock(tmp_path, pid=sleeper, slurm_job="998", slurm_step=None, slurm_restart=0)  # rank zero's
    with run_lock(tmp_path, rank_zero=False):
        pass
    assert path.exists()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path, sleeper):
    path = write_lock(tmp_path, pid=sleeper)
    release(path)
    assert path.exists()


# ---- end to end: a second resume of a running job -------------------------------------------------
def test_a_second_job_for_a_running_run_folder_is_refused_and_the_first_releases_it(data_dir, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "at_step_3"
    common = [
        *TINY,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=1",
        "callbacks.image_grids=null",
        "callbacks.run_guard.every_n_steps=1",  # a last.ckpt to resume from while the first job runs
        f"paths.data_dir={data_dir}",
    ]
    wait = ["+callbacks.stop._target_=tests.long_run_helpers.SignalAt", "+callbacks.stop.step=3"]
    wait += ["+callbacks.stop.external=true", f"+callbacks.stop.marker={marker}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        [sys.executable, "train.py", *common, *wait, f"hydra.run.dir={run}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    # the same run resumed again (train.py sends it to the run's folder)
    second = subprocess.run(
        [sys.executable, "train.py", *common, f"ckpt_path={last}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 1, second.stderr[-3000:]
    holder = json.loads((run / LOCK_NAME).read_text())
    refusal = (
        f"error: run folder {run} is in use by training process {first.pid}@{HOST} (started {holder['started']}): "
        f"two jobs in one folder overwrite each other's checkpoints; wait for it to end or stop it "
        f"(kill -TERM {first.pid} saves and exits), then resume"
    )
    assert second.stderr.strip().splitlines()[-1] == refusal, second.stderr[-3000:]
    assert last.read_bytes() == before and sorted(p.name for p in (run / "csv").iterdir()) == ["version_0"]
    assert refusal in (run / "train.log").read_text()  # the running job's log records the attempt

    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 143, err[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert not (run / LOCK_NAME).exists()
