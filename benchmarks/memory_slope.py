"""Activation memory per image of one training step (forward + backward): the slope of the peak
RSS between two batch sizes, each measured in a fresh process (CPU).

    OMP_NUM_THREADS=1 python benchmarks/memory_slope.py [--size celeba] [--k 3] [--batches 4 8]
                                                        [--activation-checkpointing]

Builds the network of ``conf/model/size/<size>.yaml`` (64x64 RGB for celeba, 32x32 grey for mnist)
on random data; prints the peak RSS per batch size, the MiB per image and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGES = {"celeba": (3, 64), "mnist": (1, 32), "tiny": (1, 32)}


def one_step(size: str, k: int, batch: int, checkpointing: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    from fusionvae.model.network import FusionVAE

    channels, image = IMAGES[size]
    sizes = yaml.safe_load((ROOT / "conf" / "model" / "size" / f"{size}.yaml").read_text())
    torch.manual_seed(0)
    net = FusionVAE(channels=channels, image_size=image, activation_checkpointing=checkpointing, **sizes)
    views, target = torch.rand(batch, k, channels, image, image), torch.rand(batch, channels, image, image)
    start = time.perf_counter()
    out = net(views, target)
    (-out.likelihood.log_prob(target).sum() + out.kl.sum()).backward()
    return dict(
        batch=batch,
        peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        seconds=time.perf_counter() - start,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="celeba", choices=sorted(IMAGES))
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs=2, default=[4, 8])
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one batch size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_step(args.size, args.k, args.one, args.activation_checkpointing)))
        return
    runs = []
    for batch in args.batches:
        cmd = [sys.executable, __file__, "--size", args.size, "--k", str(args.k), "--one", str(batch)]
        cmd += ["--activation-checkpointing"] if args.activation_checkpointing else []
        runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    (a, b) = runs
    slope = (b["peak_mib"] - a["peak_mib"]) / (b["batch"] - a["batch"])
    for run in runs:
        print(f"batch {run['batch']}: peak RSS {run['peak_mib']:.0f} MiB, step {run['seconds']:.1f} s")
    print(f"{args.size} K={args.k} checkpointing={args.activation_checkpointing}: {slope:.0f} MiB per image")
    print(
        json.dumps(
            dict(
                size=args.size,
                k=args.k,
                activation_checkpointing=args.activation_checkpointing,
                mib_per_image=round(slope),
                runs=runs,
            )
        )
    )


if __name__ == "__main__":
    main()
