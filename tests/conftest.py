import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def mnist_data_dir() -> Path | None:
    """FUSIONVAE_DATA_DIR, else the shared data folder beside the checkout."""
    for cand in (os.environ.get("FUSIONVAE_DATA_DIR"), ROOT.parent / "shared" / "data"):
        if cand and (Path(cand) / "MNIST" / "raw").is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = mnist_data_dir()
    if d is None:
        pytest.skip("MNIST not found: set FUSIONVAE_DATA_DIR to a folder holding MNIST/raw")
    return d


TINY = [
    "model/size=tiny",
    "logger=csv",
    "callbacks.progress_bar=null",
    "dataset.num_workers=0",
    "dataset.pin_memory=false",
    "dataset.batch_size=8",
    "dataset.val_batch_size=16",
    "trainer.enable_model_summary=false",
]


def save_checkpoint(module, path: Path, state_dict: dict | None = None) -> Path:
    """A checkpoint of ``module`` that ``load_from_checkpoint`` reads, without a training run
    (``state_dict`` replaces the module's own, e.g. with old key names)."""
    import lightning as L
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    state = module.state_dict() if state_dict is None else state_dict
    ckpt = {"state_dict": state, "hyper_parameters": dict(module.hparams), "pytorch-lightning_version": L.__version__}
    torch.save(ckpt, path)
    return path


def compose_cfg(config_name: str, overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=return_hydra_config)
