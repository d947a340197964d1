"""``fusionvae.training.rank_flags`` between two real processes (gloo on the CPU): flags are or-ed
over the ranks, ``LaggedFlags`` answers one exchange late; and RunGuard under the DDP trainer:
a signal that reaches one rank stops both, one batch later, with one checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusionvae.training.rank_flags import LaggedFlags, agree_now
from tests.conftest import ROOT, TINY
from tests.test_train import SHORT


def _exchange(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        cpu = torch.device("cpu")
        flags = LaggedFlags(cpu, 2)
        seen = [flags.received()]  # nothing sent yet
        flags.send(rank == 1, False)  # batch 0: rank 1 asks to stop
        seen.append(flags.received())
        flags.send(False, rank == 0)  # batch 1: rank 0 finds a checkpoint due
        seen.append(flags.received())
        seen.append(agree_now(cpu, rank == 0, False))
        with open(f"{out}{rank}.json", "w") as f:
            json.dump(seen, f)
    finally:
        dist.destroy_process_group()


def test_flags_are_or_ed_over_the_ranks_one_exchange_late(tmp_path):
    mp.spawn(_exchange, args=(str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=2)
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == [[False, False], [True, False], [False, True], [True, False]], (rank, seen)


def test_a_wrong_number_of_flags_is_refused():
    with pytest.raises(ValueError, match="^LaggedFlags sends 2 flags, got 1$"):
        LaggedFlags(torch.device("cpu"), 2).send(True)


@pytest.mark.slow
def test_a_signal_on_one_ddp_rank_stops_both_one_batch_later_with_a_checkpoint(data_dir, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            *TINY,
            "trainer=ddp_cpu",
            *SHORT,
            "trainer.limit_train_batches=6",
            "dataset.batch_size=4",
            f"paths.data_dir={data_dir}",
            f"hydra.run.dir={out}",
            "+callbacks.stop._target_=tests.long_run_helpers.SignalAt",
            "+callbacks.stop.step=2",
            "+callbacks.stop.rank=1",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout[-2000:] + proc.stderr[-3000:]
    # rank 1 asked during its batch at global step 2; both agreed on it after the next batch
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
