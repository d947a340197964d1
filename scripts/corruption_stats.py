"""Statistics of the fixed FusionMNIST validation views (what the corruption formula produces).

    FUSIONVAE_DATA_DIR=/path/to/data python scripts/corruption_stats.py [--n 5000]

Prints one JSON line: mean view intensity, fraction of non-zero view pixels and the mean of the
2-px padding, over the first ``n`` validation digits x k_max views.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from datamodules.mnist import FusionMNISTDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FUSIONVAE_DATA_DIR", "data"))
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    dm = FusionMNISTDataModule(args.data_dir, num_workers=0)
    dm.setup("validate")
    views = torch.stack(dm.val_set.__getitems__(list(range(args.n))))[:, :-1]  # [n, k_max, 1, 32, 32]
    pad = torch.ones(views.shape[-2:], dtype=torch.bool)
    pad[dm.pad : -dm.pad, dm.pad : -dm.pad] = False
    print(
        json.dumps(
            dict(
                items=args.n,
                views=views.shape[1],
                mean=round(views.mean().item(), 4),
                nonzero=round((views > 0).float().mean().item(), 4),
                padding_mean=round(views[..., pad].mean().item(), 4),
            )
        )
    )


if __name__ == "__main__":
    main()
