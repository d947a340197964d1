"""Train FusionVAE: python train.py [dataset=mnist|celeba|tless] [model=...] [trainer=...] ..."""
import hydra
from omegaconf import DictConfig

from fusionvae.instantiate import build, finish


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    datamodule, model, trainer = build(cfg)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        if cfg.get("test"):
            trainer.test(model, datamodule=datamodule, ckpt_path="best")
        metric = trainer.callback_metrics.get("val/nelbo")
        return float(metric) if metric is not None else None  # for Hydra sweepers
    finally:
        finish(trainer)


if __name__ == "__main__":
    main()
