"""Training throughput (images/s) and peak memory of one model/dataset config.

    python benchmarks/throughput.py [hydra overrides ...] [--steps 20 --warmup 3 --device cpu]
e.g. FUSIONVAE_DATA_DIR=../shared/data python benchmarks/throughput.py dataset.batch_size=64
Runs the real loss (random K per step, KL balancing, spectral + BN regularisers), backward and
Adamax step on batches from the configured datamodule; reports images/s counted as
batch items (each with up to 3 views + target).
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fusionvae.objective import training_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32", choices=["32", "bf16"])
    args, overrides = parser.parse_known_args()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp", "dataset.persistent_workers=false", *overrides])
    dm = instantiate(cfg.dataset)
    dm.prepare_data()
    dm.setup("fit")
    model = instantiate(cfg.model).to(args.device).train()
    opt = torch.optim.Adamax(model.parameters(), lr=1e-3, eps=1e-3)
    loader = iter(dm.train_dataloader())
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(batch: torch.Tensor) -> None:
        k = model.draw_k()
        model.train_batches += 1
        with autocast:
            loss = training_loss(model.terms(batch, k), model.kl_alpha, 0.5, model.loss_settings, model.regulariser())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    data_time = 0.0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start, data_time = time.perf_counter(), 0.0
        t0 = time.perf_counter()
        batch = next(loader).to(device, non_blocking=True)
        data_time += time.perf_counter() - t0
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    n = args.steps * cfg.dataset.batch_size
    params = sum(p.numel() for p in model.parameters())
    peak = (f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (GPU)" if device.type == "cuda"
            else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process RSS)")
    print(f"dataset={cfg.dataset._target_.rsplit('.', 1)[-1]} params={params / 1e6:.3f}M batch={cfg.dataset.batch_size} "
          f"device={args.device} precision={args.precision} threads={torch.get_num_threads()}")
    print(f"train: {n / elapsed:.1f} images/s ({elapsed / args.steps * 1000:.0f} ms/step, "
          f"{data_time / elapsed * 100:.0f}% waiting for data), peak memory {peak}")


if __name__ == "__main__":
    main()
