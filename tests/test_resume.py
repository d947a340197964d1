"""Exact resume: a run stopped by SIGTERM / SIGUSR1 mid-epoch or at an epoch's last batch and
resumed with the same overrides ends with weights bit-identical to an uninterrupted run, in the
same run folder, W&B run and best-checkpoint tracking."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datamodules.batched import CorruptedImages
from datamodules.paste import PasteParams, compose_views
from datamodules.training_order import EpochSampler
from fusionvae.errors import Preempted
from fusionvae.jobs.train import train
from tests.conftest import ROOT, TINY, compose_cfg

# 2 epochs of 4 batches, validation after each; deterministic kernels, one thread (OMP_NUM_THREADS)
COMMON = [
    *TINY,
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.deterministic=true",
    "callbacks.image_grids=null",
    "trainer.log_every_n_steps=1",
]
SIGNAL_AT = "+callbacks.stop._target_=tests.long_run_helpers.SignalAt"


def run_cfg(data_dir, out: Path, *overrides):
    return compose_cfg("train", [*COMMON, f"paths.data_dir={data_dir}", f"paths.output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> dict:
    """The uninterrupted run's final checkpoint."""
    out = tmp_path_factory.mktemp("straight")
    train(run_cfg(data_dir, out))
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == 8 and a["epoch"] == b["epoch"]
    differ = [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])]
    assert not differ and a["state_dict"].keys() == b["state_dict"].keys(), differ[:5]
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def best_of(ckpt: dict) -> tuple[str, float]:
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    return Path(state["best_model_path"]).name, float(state["best_model_score"])


def cli(*args: str) -> list[str]:
    return [sys.executable, "train.py", *COMMON, *args]


def test_sigterm_mid_epoch_then_resume_is_bit_identical(data_dir, straight, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    logs, marker = tmp_path / "logs", tmp_path / "at_step_5"
    common = ["logger=wandb", f"paths.data_dir={data_dir}", f"paths.log_dir={logs}"]
    # an external SIGTERM while batch 2 of epoch 1 trains (global_step 5 -> 6)
    proc = subprocess.Popen(
        cli(
            *common,
            SIGNAL_AT,
            "+callbacks.stop.step=5",
            "+callbacks.stop.external=true",
            f"+callbacks.stop.marker={marker}",
        ),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("preempted: stopped by signal 15 at step 6; checkpoint saved to")
    [run] = list((logs / "train" / "runs").iterdir())
    stopped = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == 6 and stopped["epoch"] == 1  # mid-epoch
    assert not list((run / "checkpoints").glob(".*"))  # no temporary left

    # the one-word resume: the newest run's last.ckpt, continued in the same folder and W&B run
    proc = subprocess.run(
        cli(*common, "ckpt_path=last"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((logs / "train" / "runs").iterdir()) == [run]
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert_same_training_state(final, straight)
    assert best_of(final) == best_of(straight) and (run / "checkpoints" / best_of(final)[0]).is_file()
    wandb_runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({name.rsplit("-", 1)[1] for name in wandb_runs}) == 1  # one W&B id
    assert final["fusionvae"]["wandb_id"] == wandb_runs[0].rsplit("-", 1)[1]
    [resumed_cfg] = list((run / ".hydra").glob("resume_*/overrides.yaml"))
    assert "ckpt_path=" in resumed_cfg.read_text()
    assert "callbacks.stop" in (run / ".hydra" / "overrides.yaml").read_text()  # the original's record stays


def test_sigusr1_at_the_last_batch_of_an_epoch_then_resume_is_bit_identical(data_dir, straight, tmp_path):
    # stopped after epoch 0's last batch, before its validation; in-process, the signal sent to ourselves
    with pytest.raises(Preempted) as info:
        train(run_cfg(data_dir, tmp_path, SIGNAL_AT, "+callbacks.stop.step=3", "+callbacks.stop.signal_name=SIGUSR1"))
    assert info.value.exit_code == 128 + signal.SIGUSR1 and info.value.step == 4
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    train(run_cfg(data_dir, tmp_path, f"ckpt_path={last}"))
    assert_same_training_state(torch.load(last, weights_only=True), straight)
    names = sorted(p.name for p in last.parent.iterdir())
    assert names == ["epoch001.ckpt", "epoch001.ckpt.sha256", "last.ckpt", "last.ckpt.sha256"]  # no last-v1.ckpt


# ---- the building blocks: order and randomness from (seed, epoch, index) ------------------------
def test_training_order_and_items_depend_only_on_seed_epoch_and_index():
    images = torch.rand(40, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    data = CorruptedImages(
        lambda idx: images[idx], len(images), 3, dict(n_ellipses=2, r_low=5, r_high=10, noise_std=0.25), flip=True
    )
    sampler = EpochSampler(data, batch_size=4, seed=3)
    keys = sampler.keys(0)
    assert keys == EpochSampler(data, batch_size=4, seed=3).keys(0) and sorted(k.index for k in keys) == list(range(40))
    assert [k.index for k in sampler.keys(1)] != [k.index for k in keys]  # a new order per epoch
    torch.manual_seed(1)
    batch = data.__getitems__(keys[:4])
    torch.manual_seed(2)  # the global RNG does not matter, nor what else is in the batch
    alone = data.__getitems__([keys[2], keys[0]])
    assert torch.equal(batch[2], alone[0]) and torch.equal(batch[0], alone[1])
    again_next_epoch = data.__getitems__([k for k in sampler.keys(1) if k.index == keys[0].index])
    assert not torch.equal(again_next_epoch[0][:-1], batch[0][:-1])  # fresh views each epoch
    ranks = [EpochSampler(data, 4, 3, num_replicas=3, rank=r).keys(0) for r in range(3)]
    assert sorted(k.index for r in ranks for k in r) == sorted(k.index for k in keys[:39])  # split, no overlap
    resumed = EpochSampler(data, batch_size=4, seed=3, done=lambda: 2)
    assert list(resumed) == keys[8:] and len(resumed) == 40  # skips the 2 batches done; len = the epoch


def test_pasting_draws_each_item_from_its_own_generator():
    targets = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    bank = torch.randint(0, 256, (6, 2, 50, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    params = PasteParams(n_occluders_low=2, n_occluders_high=4)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch, _ = compose_views(targets, bank, 3, params, gens(5, 6, 7))
    alone, _ = compose_views(targets[2:], bank, 3, params, gens(7))
    assert torch.equal(batch[2], alone[0])
    with pytest.raises(ValueError, match="2 generators for 3 targets"):
        compose_views(targets, bank, 3, params, gens(5, 6))


def test_evaluate_takes_the_dataset_of_the_training_run(tmp_path):
    from fusionvae.jobs.run_args import evaluate_on_training_dataset

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      dataset: celeba\n")
    (run / ".hydra" / "overrides.yaml").write_text("- dataset=celeba\n- dataset.lmdb_dir=/data/lmdb\n- seed=3\n")
    (run / "checkpoints").mkdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"")
    conf = Path(__file__).resolve().parents[1] / "conf"
    argv = ["evaluate.py", f"ckpt_path={ckpt}", "dataset.val_batch_size=4"]
    assert evaluate_on_training_dataset(argv, conf) == [
        "evaluate.py",
        "dataset=celeba",
        "dataset.lmdb_dir=/data/lmdb",
        f"ckpt_path={ckpt}",
        "dataset.val_batch_size=4",
    ]
    assert evaluate_on_training_dataset([*argv, "dataset=celeba"], conf)[1] == "dataset=celeba"
    with pytest.raises(SystemExit, match=r"was trained on dataset=celeba; drop dataset=mnist"):
        evaluate_on_training_dataset([*argv, "dataset=mnist"], conf)
    # ckpt_path=last (the newest <log_dir>/train/runs/*) together with evaluate-only overrides
    logs = tmp_path / "logs"
    newest = logs / "train" / "runs" / "r1"
    shutil.copytree(run, newest)
    last = ["evaluate.py", "ckpt_path=last", f"paths.log_dir={logs}", "eval.iw_samples=2", "task_name=ev"]
    assert evaluate_on_training_dataset(last, conf)[:3] == [
        "evaluate.py",
        "dataset=celeba",
        "dataset.lmdb_dir=/data/lmdb",
    ]
    outside = tmp_path / "model.ckpt"  # not in a run folder: arguments unchanged
    assert evaluate_on_training_dataset(["evaluate.py", f"ckpt_path={outside}"], conf) == [
        "evaluate.py",
        f"ckpt_path={outside}",
    ]


def test_run_folder_resolvers_continue_a_resumed_run_in_its_own_folder(tmp_path):
    """conf/train.yaml's hydra.run.dir / output_subdir (no command-line rewriting)."""
    from fusionvae.jobs.run_args import hydra_subdir, run_dir

    run = tmp_path / "train" / "runs" / "r1"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    loose = tmp_path / "loose.ckpt"
    loose.write_bytes(b"x")
    for ckpt in (str(run / "checkpoints" / "last.ckpt"), "last"):
        assert run_dir(ckpt, tmp_path, "train", "new") == str(run)
        assert hydra_subdir(ckpt, tmp_path, "train", "T") == ".hydra/resume_T"
    for ckpt in (None, str(loose)):
        assert run_dir(ckpt, tmp_path, "train", "new") == "new"
        assert hydra_subdir(ckpt, tmp_path, "train", "T") == ".hydra"
    assert run_dir("last", tmp_path / "empty", "train", "new") == "new"  # train() says there is none, in one line
