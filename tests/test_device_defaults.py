"""What runs where: ``trainer: default`` takes the GPU when there is one, ``precision: auto``
becomes bf16-mixed on CUDA GPUs with bf16 and 32-true elsewhere; explicit values pass through."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator

from fusionvae.training.build import build, resolve_precision
from tests.conftest import TINY, compose_cfg


def fake_cuda(monkeypatch, available: bool, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)


@pytest.mark.parametrize(
    "accelerator, available, bf16, expected",
    [
        ("auto", True, True, "bf16-mixed"),  # Ampere and newer
        ("gpu", True, True, "bf16-mixed"),
        ("cuda", True, True, "bf16-mixed"),
        ("auto", True, False, "32-true"),  # older GPUs: fp32, not fp16
        ("gpu", True, False, "32-true"),
        ("auto", False, False, "32-true"),  # no GPU
        ("cpu", True, True, "32-true"),  # the CPU, even beside a GPU
        ("mps", False, False, "32-true"),
    ],
)
def test_auto_precision(monkeypatch, accelerator, available, bf16, expected):
    fake_cuda(monkeypatch, available, bf16)
    assert resolve_precision(accelerator, "auto") == expected


def test_auto_precision_asks_for_native_bf16(monkeypatch):
    """``is_bf16_supported()`` alone is true on pre-Ampere GPUs (emulated bf16, slow)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: asked.append(including_emulation) or not including_emulation,
    )
    assert resolve_precision("auto", "auto") == "bf16-mixed" and asked == [False]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "64-true", 32, "transformer-engine"])
def test_explicit_precision_passes_through(monkeypatch, precision):
    fake_cuda(monkeypatch, True, True)
    assert resolve_precision("auto", precision) == precision
    assert resolve_precision("cpu", precision) == precision


@pytest.mark.parametrize(
    "config, overrides",
    [("train", []), ("train", ["debug=fdr"]), ("train", ["debug=overfit"]), ("evaluate", ["ckpt_path=x"])],
)
def test_default_trainer_is_auto(config, overrides):
    trainer = compose_cfg(config, overrides).trainer
    assert trainer.accelerator == "auto" and trainer.devices == 1
    assert trainer.precision == ("32-true" if config == "evaluate" else "auto")


@pytest.mark.parametrize(
    "trainer, accelerator, precision",
    [("cpu", "cpu", "32-true"), ("gpu", "gpu", "auto"), ("ddp", "gpu", "auto"), ("ddp_cpu", "cpu", "auto")],
)
def test_named_trainers(trainer, accelerator, precision):
    cfg = compose_cfg("train", [f"trainer={trainer}"]).trainer
    assert (cfg.accelerator, cfg.precision) == (accelerator, precision)


def test_precision_override_wins():
    assert compose_cfg("train", ["trainer.precision=32-true"]).trainer.precision == "32-true"


def test_build_resolves_auto_before_the_trainer(tmp_path, monkeypatch):
    """On a machine without CUDA the default trainer is a CPU fp32 one; ``trainer=cpu`` stays on the
    CPU even when a (faked) bf16 GPU is reported."""
    cfg = compose_cfg("train", [*TINY, "debug=fdr", f"paths.data_dir={tmp_path}", f"paths.output_dir={tmp_path}"])
    if not torch.cuda.is_available():
        _, _, trainer = build(cfg)
        assert isinstance(trainer.accelerator, CPUAccelerator) and trainer.precision == "32-true"
    fake_cuda(monkeypatch, True, True)
    cpu = compose_cfg(
        "train", [*TINY, "debug=fdr", "trainer=cpu", f"paths.data_dir={tmp_path}", f"paths.output_dir={tmp_path}"]
    )
    _, _, trainer = build(cpu)
    assert isinstance(trainer.accelerator, CPUAccelerator) and trainer.precision == "32-true"
