"""Train FusionVAE: python train.py [dataset=mnist|celeba|tless] [model=...] [trainer=...] ...

Resume: ``python train.py ckpt_path=<run>/checkpoints/last.ckpt`` (or ``ckpt_path=last``, the newest
run) with the original overrides; the run continues in its own folder (README, "Long runs")."""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fusionvae.errors import reported
from fusionvae.resume import resume_in_place
from fusionvae.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with reported():
        return train(cfg).get("val/nelbo")  # the objective Hydra sweepers minimise


if __name__ == "__main__":
    sys.argv = resume_in_place(sys.argv, Path(__file__).resolve().parent / "conf")
    main()
