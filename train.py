"""Train FusionVAE: python train.py [dataset=mnist|celeba|tless] [model=...] [trainer=...] ...

Resume: ``python train.py ckpt_path=<run>/checkpoints/last.ckpt`` (or ``ckpt_path=last``, the newest
run) with the original overrides; the run continues in its own folder (README, "Long runs")."""

from fusionvae.jobs.cli import train_main

if __name__ == "__main__":
    train_main()
