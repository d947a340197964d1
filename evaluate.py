"""Evaluate a checkpoint per K (NELBO, importance-weighted NLL, best-/mean-of-N MSE, PSNR, SSIM,
sample grids): python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt [eval.iw_samples=...]

The dataset and its settings come from the checkpoint's training run (``dataset=`` may only name
the same one). ``ckpt_path=last`` takes the newest training run's last.ckpt. Writes metrics.json /
metrics.csv / metrics.md, metrics_vs_k.png and images/grid_k<K>.png to the run directory and logs
``eval/<metric>_k<K>`` to the loggers (see fusionvae/evaluation.py)."""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fusionvae.errors import reported
from fusionvae.evaluation import run_evaluation
from fusionvae.resume import evaluate_on_training_dataset


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    with reported():
        return run_evaluation(cfg)


if __name__ == "__main__":
    sys.argv = evaluate_on_training_dataset(sys.argv, Path(__file__).resolve().parent / "conf")
    main()
