"""The fixed validation / test sets are benchmarks: pinned sha256 per dataset and seed, plus a
check that the 10k FusionMNIST corruptions are not a repeated block.

MNIST: the t10k views from real MNIST with the config's settings and val_seed 0. CelebA and
T-LESS: the stored valid / test / val LMDB contents (decoded pixels and checked metadata)
built with the config's settings from the deterministic stand-ins in tests/standins.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from standins import make_celeba, make_tless

import datamodules.corruption as corruption
from datamodules.lmdb_store import REQUIRED_META, LMDBReader
from tests.conftest import compose_cfg

BUMP = (
    "The fixed {what} changed: its sha256 is {got}, pinned {want}. Validation / test sets are benchmarks and "
    "must not change silently. If the change is deliberate, make it a documented version bump (the "
    "generator VERSION for LMDBs, a README note for FusionMNIST) and update the pinned hash in {file}."
)

GOLDEN = {
    "mnist_val_seed0": "82a1fd52a7ca5987fa2917c43a62392fc47fdc32041b734a3590504656adacc8",
    "celeba_valid_seed0": "f775908f7c0368687473294ac2e5c62bbbe9c2f2d5c53cb2fd36b75126ffe2e2",
    "celeba_test_seed0": "5d3fc7e91eeee530ba445b2d3bacacf7f7bf6f43ae875fe06f69b1e41d9d62a2",
    # re-pinned 2026-12-02: the generator code of 1f31b6e (unchanged since) gives this hash on a fresh install
    # (pillow 13.0.0, numpy 2.4.6, torch 2.14.1) and the old one no more: a library changed, not the generator
    "tless_val_seed0": "4b3ffe499cc1bc2fd0f18d8c8a32ad0fafabdbe28b0345b7b97886aea72ed895",
}


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _check(key: str, got: str, what: str) -> None:
    assert got == GOLDEN[key], BUMP.format(what=what, got=got, want=GOLDEN[key], file=Path(__file__).name)


def _dataset_cfg(name: str, data_dir: Path, *overrides: str):
    return compose_cfg(
        "train",
        [
            f"dataset={name}",
            f"paths.data_dir={data_dir}",
            "dataset.num_workers=0",
            "dataset.pin_memory=false",
            *overrides,
        ],
    ).dataset


def lmdb_digest(path: Path) -> str:
    """Decoded records (uint8 pixels) and the checked metadata fields of an LMDB."""
    reader = LMDBReader(path)
    meta = {k: reader.meta[k] for k in REQUIRED_META}
    pixels = reader.get_many(range(len(reader)))
    reader.close()
    return _digest(json.dumps(meta, sort_keys=True).encode(), str(pixels.shape).encode(), pixels.tobytes())


# ---- FusionMNIST ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_val(data_dir, monkeypatch_module):
    """The fixed validation set, with the ellipse masks it was drawn with recorded."""
    masks = []
    draw = corruption.ellipse_masks

    def recording(*args, **kwargs):
        masks.append(draw(*args, **kwargs))
        return masks[-1]

    monkeypatch_module.setattr(corruption, "ellipse_masks", recording)
    dm = instantiate(_dataset_cfg("mnist", data_dir))
    dm.setup("validate")
    monkeypatch_module.undo()
    return dm.val_set, torch.cat(masks)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_mnist_fixed_validation_set_is_pinned(mnist_val):
    val, _ = mnist_val
    assert val.noisy.shape == (10_000, 3, 1, 32, 32) and val.images.shape == (10_000, 1, 32, 32)
    got = _digest(str(tuple(val.noisy.shape)).encode(), val.noisy.numpy().tobytes(), val.images.numpy().tobytes())
    _check("mnist_val_seed0", got, "FusionMNIST validation/test set (val_seed 0)")


def test_mnist_validation_corruption_is_not_periodic(mnist_val):
    """Neither the ellipse masks nor the noise repeat through the 10,000 items (e.g. a generator
    re-seeded for every chunk of 1000 would repeat them with period 1000)."""
    val, masks = mnist_val
    masks = masks.flatten(1)  # [10000, views * H * W]
    assert masks.shape[0] == 10_000
    noisy = val.noisy.flatten(2).long()  # [10000, views, H * W]
    background = (val.images.flatten(1) == 0).unsqueeze(1)  # there a view is max(0, noise), whatever the mask
    for period in (1, 2, 10, 100, 500, 1000, 2000, 2500, 5000):
        a, b = slice(0, 10_000 - period), slice(period, 10_000)
        same_mask = (masks[a] == masks[b]).all(1).float().mean().item()
        assert same_mask < 0.05, (period, same_mask)  # independent draws: practically never equal
        both = background[a] & background[b]
        same_noise = ((noisy[a] == noisy[b]) & both).sum().item() / both.expand_as(noisy[a]).sum().item()
        # independent noise agrees where both pixels are clipped to 0 (~1/4) or round alike: ~0.27
        assert same_noise < 0.5, (period, same_noise)


# ---- FusionCelebA and FusionT-LESS (stand-ins) --------------------------------------------------
def test_celeba_stored_validation_and_test_sets_are_pinned(tmp_path):
    root = make_celeba(tmp_path, n_train=1, n_valid=6, n_test=6)
    dm = instantiate(_dataset_cfg("celeba", root, "dataset.workers=0"))
    dm.prepare_data()
    for split in ("valid", "test"):
        _check(
            f"celeba_{split}_seed0",
            lmdb_digest(root / "fusion_celeba_lmdb" / split),
            f"FusionCelebA {split} LMDB (stand-in, val_seed 0)",
        )


def test_tless_stored_validation_set_is_pinned(tmp_path):
    make_tless(tmp_path / "tless", occluder_ids=(6, 7, 8), per_object=4)
    dm = instantiate(
        _dataset_cfg("tless", tmp_path, "dataset.workers=0", "dataset.occluder_ids=[6,7,8]", "dataset.n_val=5")
    )
    dm.prepare_data()
    _check(
        "tless_val_seed0",
        lmdb_digest(tmp_path / "fusion_tless_lmdb" / "val"),
        "FusionT-LESS val LMDB (stand-in, val_seed 0)",
    )
