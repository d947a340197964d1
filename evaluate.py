"""Evaluate a checkpoint per K: python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt [dataset=...]"""
import hydra
from omegaconf import DictConfig

from fusionvae.evaluation import run_evaluation


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    return run_evaluation(cfg)


if __name__ == "__main__":
    main()
