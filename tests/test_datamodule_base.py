"""FusionDataModule: the items of every split are checked against the config before training."""

import pytest
import torch

from datamodules.base import FusionDataModule


class Fixed(FusionDataModule):
    def __init__(self, shape, **kwargs):
        super().__init__(num_workers=0, pin_memory=False, **kwargs)
        self.val_set = [torch.zeros(shape)] * 3


def test_matching_items_pass():
    dm = Fixed((4, 1, 32, 32), channels=1, image_size=32, k_max=3)
    assert next(iter(dm.val_dataloader())).shape == (3, 4, 1, 32, 32)


@pytest.mark.parametrize(
    "shape, config", [((4, 3, 32, 32), "channels"), ((4, 1, 64, 64), "image_size"), ((3, 1, 32, 32), "k_max")]
)
def test_mismatching_items_are_refused_with_the_keys_to_fix(shape, config):
    dm = Fixed(shape, channels=1, image_size=32, k_max=3)
    with pytest.raises(
        ValueError,
        match=rf"Fixed validation / test items are \[{', '.join(map(str, shape))}\] .* "
        rf"expects \[4, 1, 32, 32\]: fix dataset.k_max / dataset.channels",
    ):
        dm.val_dataloader()


def test_gpu_loader_defaults_adapt_to_a_small_cpu_machine(monkeypatch):
    """num_workers: 4 and pin_memory: true are GPU-node defaults: on 2 cores without CUDA the loader
    gets 2 workers and no pinning (PyTorch warns about both otherwise)."""
    dm = Fixed((4, 1, 32, 32), channels=1, image_size=32, k_max=3)
    dm.num_workers, dm.pin_memory, dm.persistent_workers = 4, True, True
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loader = dm.val_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (2, False, True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert (dm.val_dataloader().num_workers, dm.val_dataloader().pin_memory) == (4, True)
