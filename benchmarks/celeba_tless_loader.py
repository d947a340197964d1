"""Training-loader throughput (samples/s) of FusionCelebA and FusionT-LESS.

    python benchmarks/celeba_tless_loader.py [--celeba-root DATA_DIR] [--tless-bop-root BOP_TLESS]
        [--batches 40] [--batch-size 32] [--num-workers 4 0]

Without real paths, stand-ins with the real layouts are generated in a temporary directory
(tests/standins.py). Each sample is a [k_max + 1, C, 64, 64] stack; the first batch (worker start)
is timed separately and excluded from the rate.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from standins import make_celeba, make_tless  # noqa: E402

from datamodules.celeba import FusionCelebADataModule  # noqa: E402
from datamodules.tless import FusionTLessDataModule  # noqa: E402


def measure(dm, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, samples/s over the next ``batches`` batches)."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    stream = itertools.chain.from_iterable(itertools.repeat(loader))  # restart epochs as needed
    start = time.perf_counter()
    next(stream)
    first = time.perf_counter() - start
    start, samples = time.perf_counter(), 0
    for batch in itertools.islice(stream, batches):
        samples += len(batch)
    return first, samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--celeba-root", help="data_dir holding celeba/ (default: a generated stand-in)")
    parser.add_argument("--tless-bop-root", help="BOP T-LESS root (default: a generated stand-in)")
    parser.add_argument("--lmdb-dir", help="where LMDBs go (default: beside the data)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, nargs="+", default=[4, 0])
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fusion_loader_bench_"))
    torch.set_num_threads(1)  # the main process of a training run is busy with the model
    celeba_root = args.celeba_root or make_celeba(tmp / "data", n_train=640, n_valid=64, n_test=64)
    if args.tless_bop_root is None:
        make_tless(tmp / "data" / "tless", occluder_ids=tuple(range(6, 18)), per_object=100, size=200)
        tless_kwargs = dict(data_dir=str(tmp / "data"), n_val=64)
    else:
        tless_kwargs = dict(data_dir=str(tmp / "data"), bop_root=args.tless_bop_root)
    lmdb = Path(args.lmdb_dir) if args.lmdb_dir else None
    common = dict(batch_size=args.batch_size, pin_memory=False)  # persistent workers, as configured
    print(f"batch size {args.batch_size}, {args.batches} timed batches, torch {torch.__version__}")
    for name, make in (
        (
            "FusionCelebA",
            lambda w: FusionCelebADataModule(
                data_dir=str(celeba_root), lmdb_dir=str(lmdb / "celeba") if lmdb else None, num_workers=w, **common
            ),
        ),
        (
            "FusionT-LESS",
            lambda w: FusionTLessDataModule(
                lmdb_dir=str(lmdb / "tless") if lmdb else None, num_workers=w, **tless_kwargs, **common
            ),
        ),
    ):
        make(0).prepare_data()
        for workers in args.num_workers:
            first, rate = measure(make(workers), args.batches)
            print(f"{name:13s} num_workers={workers}: {rate:8.1f} samples/s (first batch after {first:.2f} s)")


if __name__ == "__main__":
    main()
