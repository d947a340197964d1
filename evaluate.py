"""Evaluate a checkpoint per K (NELBO, importance-weighted NLL, best-/mean-of-N MSE, PSNR, SSIM,
sample grids): python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt [eval.iw_samples=...]

The dataset and its settings come from the checkpoint's training run (``dataset=`` may only name
the same one). ``ckpt_path=last`` takes the newest training run's last.ckpt. Writes metrics.json /
metrics.csv / metrics.md, metrics_vs_k.png and images/grid_k<K>.png to the run directory and logs
``eval/<metric>_k<K>`` to the loggers (see fusionvae/jobs/evaluate.py)."""

from fusionvae.jobs.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
