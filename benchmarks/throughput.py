"""Training throughput, peak memory and ops per step of one model/dataset config: the real
Lightning training step (objective, skip checks, optimiser, schedule, logging) on real batches.

    python benchmarks/throughput.py [hydra overrides ...] [--k 3] [--steps 20 --warmup 3]
                                    [--device cpu|cuda] [--precision 32|bf16]
e.g. FUSIONVAE_DATA_DIR=/path/to/data OMP_NUM_THREADS=1 python benchmarks/throughput.py dataset.batch_size=64

Runs ``--warmup`` batches, one more under ``HostWaits``, then ``--steps`` timed ones. Reports
images/s (batch items, each with up to k_max views + target), ms/step, peak memory (the process's
RSS on CPU, the CUDA allocator's peak on GPU), the leaf ATen ops of the last warm-up batch
(torch.profiler; on a GPU each is at least one kernel launch) and the host syncs of the next one
(the ops that make the host wait for the device, ``fusionvae.training.host_waits``: device values
read into Python, outputs sized by their values; each stalls a GPU) and GFLOP (convolutions and
matrix products, forward and backward: torch.utils.flop_counter; it sees dispatched ops only, so
not the kernels of cells compiled by inductor: take the GFLOP of an eager run). The last line is JSON.
``--k`` fixes K for every step (default: drawn per batch, as in training).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from fusionvae.training.host_waits import HostWaits

# leaf ops that launch no kernel: views, allocations and no-op conversions
NO_KERNEL = {
    "aten::" + n
    for n in (
        "as_strided",
        "as_strided_",
        "view",
        "_unsafe_view",
        "_reshape_alias",
        "reshape",
        "flatten",
        "unsqueeze",
        "squeeze",
        "permute",
        "t",
        "transpose",
        "expand",
        "slice",
        "select",
        "split",
        "chunk",
        "unbind",
        "alias",
        "detach",
        "resolve_conj",
        "resolve_neg",
        "empty",
        "empty_strided",
        "resize_",
        "to",
        "lift_fresh",
    )
}


# a device value read into Python (.item(), bool(), int() of a tensor): copies a value, runs no kernel
HOST_READ = "aten::_local_scalar_dense"


def leaf_aten_ops(prof) -> tuple[int, int]:
    """ATen ops with no ATen op below them (the work actually dispatched) and those of them that
    run a kernel (views, allocations and host reads left out)."""
    names = [
        e.name
        for e in prof.events()
        if e.name.startswith("aten::") and not any(c.name.startswith("aten::") for c in e.cpu_children)
    ]
    return len(names), sum(1 for n in names if n not in NO_KERNEL and n != HOST_READ)


class StepMeter(L.Callback):
    """Profiles the last of ``warmup`` batches, lists the host syncs of the next one (``syncs``: op
    name -> calls) and counts its floating-point operations (``flops``: torch's FlopCounterMode,
    convolutions and matrix products, forward and backward), and times the batches after it."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.first_timed = warmup + 1
        self.times: list[float] = []
        self.ops = self.kernel_ops = 0
        self.syncs: dict[str, int] = {}
        self.flops = 0
        self._profiler = self._waits = self._flops = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync()
        if batch_idx == self.warmup - 1:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profiler.__enter__()
        if batch_idx == self.warmup:  # its own batch: under a dispatch mode the profiler sees every op twice
            self._flops = FlopCounterMode(display=False).__enter__()
            self._waits = HostWaits().__enter__()
        if batch_idx == self.first_timed and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync()
        if batch_idx >= self.first_timed:
            self.times.append(time.perf_counter() - self._start)
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self.ops, self.kernel_ops = leaf_aten_ops(self._profiler)
            self._profiler = None
        if self._waits is not None:
            self._waits.__exit__(None, None, None)
            self._flops.__exit__(None, None, None)
            self.syncs, self._waits = dict(Counter(self._waits.ops)), None
            self.flops, self._flops = self._flops.get_total_flops(), None


def build(overrides: list[str], k: int | None):
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp", "dataset.persistent_workers=false", *overrides])
    dm, model = instantiate(cfg.dataset), instantiate(cfg.model)
    if k is not None:
        if not 0 <= k <= cfg.dataset.k_max:
            raise SystemExit(f"--k must be in [0, {cfg.dataset.k_max}], got {k}")
        model.draw_k = lambda: k  # every step fuses k views
    return cfg, dm, model


def training_only(callback: L.Callback, max_steps: int, accelerator: str = "cpu", precision: str = "32-true"):
    """A trainer for ``max_steps`` training steps and nothing else (no validation, logger,
    checkpoints or progress bar), with ``callback`` measuring them."""
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=max_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir="/tmp/fusionvae_benchmark",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--k", type=int, default=None, help="fixed number of input views (default: random per step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32", choices=["32", "bf16"])
    args, overrides = parser.parse_known_args()
    cfg, dm, model = build(overrides, args.k)
    device = torch.device(args.device)
    meter = StepMeter(max(1, args.warmup), device)
    precision = "bf16-mixed" if args.precision == "bf16" else "32-true"
    trainer = training_only(meter, meter.first_timed + args.steps, args.device, precision)
    trainer.fit(model, datamodule=dm)
    step = sorted(meter.times)[len(meter.times) // 2]  # median
    batch = cfg.dataset.batch_size
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) / 2**20
    result = dict(
        dataset=cfg.dataset._target_.rsplit(".", 1)[-1],
        params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        batch=batch,
        k=args.k,
        device=args.device,
        precision=args.precision,
        threads=torch.get_num_threads(),
        images_per_s=round(batch / step, 1),
        ms_per_step=round(step * 1000, 1),
        peak_mib=round(peak),
        peak_kind="cuda" if device.type == "cuda" else "rss",
        ops_per_step=meter.ops,
        kernel_ops_per_step=meter.kernel_ops,
        gflop_per_step=round(meter.flops / 1e9, 2),
        host_syncs_per_step=sum(meter.syncs.values()),
        host_syncs=meter.syncs,
    )
    print(
        f"{result['dataset']} batch={batch} K={args.k if args.k is not None else 'random'} {args.device} "
        f"{args.precision}: {result['images_per_s']} images/s ({result['ms_per_step']} ms/step, median of "
        f"{len(meter.times)}), peak {result['peak_mib']} MiB ({result['peak_kind']}), {meter.ops} leaf ATen ops/step "
        f"({meter.kernel_ops} with a kernel), {result['host_syncs_per_step']} host syncs"
        f"{f' {meter.syncs}' if meter.syncs else ''}, {result['gflop_per_step']} GFLOP/step"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
