"""Data-loading throughput of one dataset config (no model): samples/s and batches/s.

    python benchmarks/loader_throughput.py [--batches 200 --warmup 20 --split train] [hydra overrides ...]
e.g. FUSIONVAE_DATA_DIR=/path/to/data python benchmarks/loader_throughput.py \\
         dataset=mnist dataset.batch_size=64 dataset.num_workers=2
Composes conf/train.yaml with the overrides, instantiates ``cfg.dataset``, runs prepare_data and
setup, then times ``--batches`` batches of the chosen loader after ``--warmup`` untimed ones
(worker start-up included in the warm-up); epochs are chained if the loader is shorter.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader

CONF = Path(__file__).resolve().parents[1] / "conf"


def endless(loader: DataLoader) -> Iterator[torch.Tensor]:
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200, help="timed batches")
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches first")
    parser.add_argument("--split", default="train", choices=["train", "val"])
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. dataset.num_workers=2")
    args = parser.parse_args()

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    dm = instantiate(cfg.dataset)
    start = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    print(f"{type(dm).__name__}: prepare_data + setup {time.perf_counter() - start:.2f} s")

    loader = dm.train_dataloader() if args.split == "train" else dm.val_dataloader()
    batches = endless(loader)
    for _ in range(args.warmup):
        next(batches)
    samples = 0
    start = time.perf_counter()
    for _ in range(args.batches):
        samples += next(batches).shape[0]
    elapsed = time.perf_counter() - start
    print(
        f"{args.split}: batch_size={loader.batch_size} num_workers={loader.num_workers} "
        f"{args.batches} batches in {elapsed:.2f} s -> {samples / elapsed:.0f} samples/s, "
        f"{args.batches / elapsed:.1f} batches/s"
    )


if __name__ == "__main__":
    main()
