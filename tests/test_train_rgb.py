"""One fast-dev-run training step per RGB dataset on small stand-ins with the real layouts."""

import pytest
import torch
from standins import make_celeba, make_tless

from fusionvae.jobs.train import train
from tests.conftest import TINY, compose_cfg

RGB = [*TINY, "dataset.batch_size=4", "dataset.val_batch_size=4", "dataset.workers=1", "debug=fdr"]


@pytest.mark.parametrize(
    "dataset, make, extra",
    [
        ("celeba", lambda root: make_celeba(root), []),
        ("tless", lambda root: make_tless(root / "tless"), ["dataset.n_val=6", "dataset.occluder_ids=[6,7,8]"]),
    ],
)
def test_fast_dev_run_rgb(tmp_path, dataset, make, extra):
    make(tmp_path)
    cfg = compose_cfg(
        "train",
        [f"dataset={dataset}", *RGB, *extra, f"paths.data_dir={tmp_path}", f"paths.output_dir={tmp_path / 'out'}"],
    )
    assert cfg.model.channels == 3 and cfg.model.bits_per_dim
    metrics = train(cfg)
    for k in range(4):
        bpd = metrics[f"val/nelbo_k{k}"]
        assert torch.isfinite(torch.tensor(bpd)) and 0 < bpd < 20  # bits/dim of an untrained model
