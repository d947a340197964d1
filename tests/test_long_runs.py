"""Long runs: skipped steps leave the state untouched, the consecutive-skip limit, atomic
checkpoint / LMDB writes under kills, stale temporaries, one-line up-front errors."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from datamodules.images import encode_stack
from datamodules.lmdb_store import LMDBReader, ensure_lmdb, is_complete
from datamodules.tempfiles import HOST
from fusionvae.errors import CheckpointError, FusionVAEError, TooManySkippedSteps
from fusionvae.jobs.fuse import main as fuse_main
from fusionvae.jobs.reporting import reported
from fusionvae.jobs.train import train
from fusionvae.training.build import build
from fusionvae.training.checkpoint_io import AtomicCheckpointIO, remove_stale_temps
from fusionvae.training.module import FusionVAEModule
from tests.conftest import ROOT, TINY, compose_cfg, save_checkpoint
from tests.long_run_helpers import Poison
from tests.test_network import TINY as TINY_NET

RUN = [
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "callbacks.image_grids=null",
    "trainer.log_every_n_steps=1",
]
POISON = "+callbacks.poison._target_=tests.long_run_helpers.Poison"
BOOKKEEPING = ("skipped_steps", "train_batches")


def cfg_for(data_dir, out: Path, *overrides):
    return compose_cfg("train", [*TINY, *RUN, f"paths.data_dir={data_dir}", f"paths.output_dir={out}", *overrides])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class StateWatch(L.Callback):
    """Full state (module, optimiser with its step count, which drives the LR schedule and the KL
    warm-up) before each batch; after a skipped batch, the differences from it."""

    def __init__(self):
        self.changed: dict[int, list[str]] = {}

    @staticmethod
    def state(trainer, module) -> dict:
        flat = {f"module.{k}": v for k, v in module.state_dict().items() if k not in BOOKKEEPING}
        opt = trainer.optimizers[0].state_dict()
        for pid, st in opt["state"].items():
            flat.update({f"opt.{pid}.{k}": v for k, v in st.items()})
        flat.update(
            {
                f"opt.group.{k}": torch.tensor(v)
                for k, v in opt["param_groups"][0].items()
                if isinstance(v, (int, float))
            }
        )
        return {k: torch.as_tensor(v).clone() for k, v in flat.items()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = copy.deepcopy(self.state(trainer, module))
        self.skipped = int(module.skipped_steps)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if int(module.skipped_steps) > self.skipped:
            after = self.state(trainer, module)
            self.changed[int(module.train_batches)] = [
                k for k, v in self.before.items() if not torch.equal(v, after[k])
            ]


@pytest.mark.parametrize(
    "kind, batches", [("input", [1]), ("activation", [2, 4]), ("overflow", [3]), ("gradient", [2, 4])]
)
def test_skipped_steps_leave_the_state_untouched(data_dir, tmp_path, kind, batches):
    cfg = cfg_for(
        data_dir,
        tmp_path,
        "trainer.limit_train_batches=6",
        POISON,
        f"+callbacks.poison.batches=[{','.join(map(str, batches))}]",
        f"+callbacks.poison.kind={kind}",
    )
    datamodule, model, trainer = build(cfg)
    watch = StateWatch()
    trainer.callbacks.append(watch)
    trainer.fit(model, datamodule=datamodule)
    assert sorted(watch.changed) == batches and all(not diff for diff in watch.changed.values()), watch.changed
    # global_step counts batches; the LR schedule and the KL warm-up follow the optimiser's step
    # count, which counts successful steps only
    assert int(model.skipped_steps) == len(batches) and trainer.global_step == 6
    assert int(trainer.optimizers[0].steps_done()) == 6 - len(batches)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in ckpt["state_dict"].values())
    assert torch.isfinite(trainer.callback_metrics["val/nelbo"])


def test_grad_scaler_skips_and_backs_off(data_dir, tmp_path):
    cfg = cfg_for(data_dir, tmp_path)
    datamodule, model, _ = build(cfg)
    # Lightning maps precision=16-mixed to bf16 on the CPU; a plugin with a GradScaler keeps fp16
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))
    watch = StateWatch()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        plugins=[plugin],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Poison(batches=[2], kind="gradient"), watch],
    )
    trainer.fit(model, datamodule=datamodule)
    assert watch.changed == {2: []} and int(trainer.optimizers[0].steps_done()) == 2
    assert plugin.scaler.get_scale() == plugin.scaler.get_backoff_factor()  # lowered once from 1, no step


def test_consecutive_skip_limit_stops_with_one_line(data_dir, tmp_path):
    cfg = cfg_for(
        data_dir,
        tmp_path,
        "trainer.limit_train_batches=10",
        "model.loss.max_consecutive_skips=2",
        "callbacks.run_guard.every_n_steps=1",
        POISON,
        "+callbacks.poison.from_batch=4",
    )
    with pytest.raises(TooManySkippedSteps) as info:
        train(cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith("3 consecutive training steps had a non-finite loss")
    # batches 4-6 skipped; found at the logging step of batch 6, before its checkpoint
    assert "max_consecutive_skips=2" in message and "found at step 6" in message
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5 and all(torch.isfinite(v.float()).all() for v in ckpt["state_dict"].values())
    assert int(ckpt["state_dict"]["skipped_steps"]) == 2 and ckpt["optimizer_states"][0]["state"][0]["step"] == 3


@pytest.mark.parametrize("every_minutes, saved", [("1e-9", True), ("null", False)])
def test_run_guard_writes_last_ckpt_on_the_clock(data_dir, tmp_path, every_minutes, saved):
    cfg = cfg_for(
        data_dir,
        tmp_path,
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint=null",
        "+trainer.enable_checkpointing=false",
        f"callbacks.run_guard.every_minutes={every_minutes}",
    )
    train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file() == saved and (not saved or torch.load(last, weights_only=True)["global_step"] == 2)


# ---- atomic writes, kills and leftovers ---------------------------------------------------------
def test_checkpoint_write_that_fails_midway_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == good and sorted(os.listdir(tmp_path)) == ["last.ckpt", "last.ckpt.sha256"]


KILLED_WRITER = """
import sys, time, torch
from fusionvae.training.checkpoint_io import AtomicCheckpointIO
def slow(obj, f):
    f.write(b"PK half")
    f.flush()
    time.sleep(60)
torch.save = slow
AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, sys.argv[1])
"""


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigkill_during_checkpoint_write_leaves_only_a_stale_temp(tmp_path):
    folder = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(folder / "last.ckpt")], cwd=ROOT)
    wait_for(lambda: any(folder.glob(".last.ckpt.tmp-*")))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftover = next(folder.glob(".last.ckpt.tmp-*"))
    assert not (folder / "last.ckpt").exists() and leftover.name.startswith(f".last.ckpt.tmp-{proc.pid}-{HOST}-")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = folder / f".epoch001.ckpt.tmp-{sleeper.pid}-{HOST}-abcd1234"
        legacy, remote = folder / f".epoch000.ckpt.tmp{dead_pid()}", folder / ".x.ckpt.tmp-7-otherhost-abcd1234"
        for p in (live, legacy, remote):
            p.write_bytes(b"junk")
        assert sorted(remove_stale_temps(folder)) == sorted([leftover, legacy, remote])
        assert [p.name for p in folder.iterdir()] == [live.name]  # a live writer's file stays
    finally:
        sleeper.kill()
        sleeper.wait()


KILLED_LMDB = """
import sys, time, numpy as np
from pathlib import Path
from datamodules.images import encode_stack
from datamodules.lmdb_store import write_lmdb
def records():
    yield encode_stack(np.zeros((1, 4, 4, 3), np.uint8))
    Path(sys.argv[2]).write_text("1")
    time.sleep(60)
meta = dict(kind="t", version=1, count=3, shape=[1, 4, 4, 3], channels=3, seed=0, params={})
write_lmdb(sys.argv[1], records(), meta)
"""


def test_sigkill_during_lmdb_build_is_cleaned_up_and_rebuilt(tmp_path):
    meta = dict(kind="t", version=1, count=3, shape=[1, 4, 4, 3], channels=3, seed=0, params={})
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_LMDB, str(tmp_path / "x"), str(tmp_path / "marker")], cwd=ROOT
    )
    wait_for((tmp_path / "marker").exists)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (tmp_path / "marker").unlink()
    [leftover] = list(tmp_path.iterdir())
    assert leftover.name.startswith(f".x.tmp-{proc.pid}-{HOST}-") and not is_complete(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="unfinished .x.tmp-"):
        LMDBReader(tmp_path / "x")  # the half-built LMDB is never read
    stacks = [torch.full((1, 4, 4, 3), i, dtype=torch.uint8).numpy() for i in range(3)]
    assert ensure_lmdb(tmp_path / "x", meta, lambda: (encode_stack(s) for s in stacks))
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # the stale temp is gone
    assert (LMDBReader(tmp_path / "x", meta).get(2) == 2).all()


# ---- up-front checks ----------------------------------------------------------------------------
def tiny_checkpoint(path: Path, **hparams) -> Path:
    return save_checkpoint(FusionVAEModule(**{**TINY_NET, **hparams}), path)


def test_mismatched_checkpoint_is_refused_before_data_preparation(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "k3.ckpt", k_max=3)
    cfg = cfg_for(tmp_path / "no_data_here", tmp_path / "out", "dataset.k_max=2", f"ckpt_path={ckpt}")
    with pytest.raises(CheckpointError) as info:
        train(cfg)  # a missing MNIST would raise FileNotFoundError if data came first
    message = str(info.value)
    assert "\n" not in message and str(ckpt) in message
    assert "1x32x32 images (CxHxW) with k_max=3" in message and "gives 1x32x32 images (CxHxW) with k_max=2" in message
    cfg = cfg_for(tmp_path / "no_data_here", tmp_path / "out", f"ckpt_path={ckpt}", "model.num_channels=8")
    with pytest.raises(CheckpointError, match=r"model\.num_channels: checkpoint 4, config 8"):
        train(cfg)


def run_cli(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_errors_are_one_line(tmp_path):
    proc = run_cli("evaluate.py", f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: evaluate.py needs a checkpoint: add ckpt_path=<run dir>/"
        "checkpoints/last.ckpt (or ckpt_path=last for the newest training run)"
    )
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(tiny_checkpoint(tmp_path / "ok.ckpt").read_bytes()[:5000])  # truncated by a crash
    proc = run_cli("train.py", *TINY, f"ckpt_path={damaged}", f"hydra.run.dir={tmp_path / 'train'}")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last.startswith(f"error: checkpoint {damaged} cannot be read (") and "damaged" in last


def test_errors_are_one_line_unless_hydra_full_error(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info, reported():
        raise CheckpointError("checkpoint x is damaged")
    assert exit_info.value.code == 1 and capsys.readouterr().err == "error: checkpoint x is damaged\n"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(CheckpointError), reported():
        raise CheckpointError("checkpoint x is damaged")


def test_fuse_refuses_non_images_in_one_line(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "m.ckpt")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    missing = tmp_path / "none.ckpt"
    for args, expected in (
        ([str(text)], f"error: {text} is not an image file that can be read"),
        ([], f"error: checkpoint not found: {missing}"),
    ):
        ck = missing if not args else ckpt
        with pytest.raises(SystemExit) as exit_info:
            fuse_main(["--ckpt", str(ck), "--out", str(tmp_path / "o.png"), *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(expected) and err.count("\n") == 1
    module = FusionVAEModule(**TINY_NET)
    from fusionvae.jobs.fuse import fuse

    with pytest.raises(FusionVAEError, match=r"float images in \[0, 1\].*divide 8-bit images by 255"):
        fuse(module, torch.full((1, 1, 32, 32), 200, dtype=torch.uint8))
    with pytest.raises(FusionVAEError, match=r"views are \(1, 3, 32, 32\) but the model takes \[K <= 3, 1, 32, 32\]"):
        fuse(module, torch.rand(1, 3, 32, 32))
