"""Train FusionVAE: python train.py [dataset=mnist|celeba|tless] [model=...] [trainer=...] ..."""
import hydra
from omegaconf import DictConfig

from fusionvae.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg).get("val/nelbo")  # the objective Hydra sweepers minimise


if __name__ == "__main__":
    main()
