"""A small image classifier for evaluation's semantic metrics (``eval.classifier``).

Pixel metrics reward a blurry mean image; a classifier asks whether a fused sample shows the right
digit. ``semantic_metrics`` classifies the clean target and the N samples with one net and gives
per item ``class_best`` (1 if any sample gets the target's class) and ``class_mean`` (the share of
samples that do). The reference is the classifier's reading of the clean target, so a sample equal
to the target always counts and no labels are needed; the net's accuracy on the clean test set is
stored with it and printed by the reports that use it.

    python -m fusionvae.evaluation.classifier --data-dir /path/to/data --out logs/digit_classifier.pt

trains it once on clean, padded MNIST (about a minute on one CPU core); ``ensure_classifier``
reuses the file when it exists.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

from datamodules.mnist import load_mnist_images, load_mnist_labels
from fusionvae.files import replaced


class ImageClassifier(nn.Module):
    """Two 3x3 conv layers with ReLU and 2x2 max-pool, then two linear layers (the classic MNIST net)."""

    def __init__(self, channels: int = 1, classes: int = 10, width: int = 32, size: int = 32):
        super().__init__()
        self.config = {"channels": channels, "classes": classes, "width": width, "size": size}
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (size // 4) ** 2, 128),
            nn.ReLU(),
            nn.Linear(128, classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, classes]`` of images ``[B, C, H, W]`` in [0, 1]."""
        return self.net(images.float() * 2 - 1)


def fit(
    images: torch.Tensor, labels: torch.Tensor, epochs: int = 2, batch_size: int = 128, lr: float = 2e-3, seed: int = 0
) -> ImageClassifier:
    """An ``ImageClassifier`` trained with Adam on uint8 ``images [N, C, H, W]`` and ``labels [N]``."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ImageClassifier(images.shape[1], int(labels.max()) + 1, size=images.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(images[idx].float() / 255), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Share of uint8 ``images`` classified as ``labels``."""
    model.eval()
    hits = sum(
        int((model(images[i : i + batch_size].float() / 255).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    return hits / len(images)


def save(model: ImageClassifier, path: str | Path, test_accuracy: float) -> Path:
    """Write the classifier atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced(path, "wb") as f:
        torch.save({"state_dict": model.state_dict(), "config": model.config, "test_accuracy": test_accuracy}, f)
    return path


def load(path: str | Path) -> tuple[ImageClassifier, float]:
    """The classifier saved at ``path`` (eval mode) and its clean test accuracy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier not found: {path}; train it with `python -m fusionvae.evaluation.classifier "
            f"--out {path}` or set eval.classifier=null"
        )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = ImageClassifier(**saved["config"])
    model.load_state_dict(saved["state_dict"])
    return model.eval(), float(saved["test_accuracy"])


def ensure_classifier(
    data_dir: str | Path, path: str | Path, pad: int = 2, epochs: int = 2, items: int | None = None
) -> tuple[Path, float]:
    """``path`` holding a digit classifier trained on the first ``items`` (None: all) clean MNIST
    training digits padded by ``pad`` (trained now if missing), and its clean test accuracy."""
    path = Path(path)
    if path.is_file():
        return path, load(path)[1]
    images, labels = load_mnist_images(data_dir, "train", pad), load_mnist_labels(data_dir, "train")
    model = fit(images[:items], labels[:items], epochs)
    test_accuracy = accuracy(model, load_mnist_images(data_dir, "test", pad), load_mnist_labels(data_dir, "test"))
    return save(model, path, test_accuracy), test_accuracy


@torch.no_grad()
def semantic_metrics(classifier: nn.Module, samples: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """``class_best`` / ``class_mean`` ``[B]`` of ``samples [B, N, C, H, W]``: whether any / which
    share of the N samples the classifier puts in the class it gives the clean ``target [B, C, H, W]``."""
    b, n = samples.shape[:2]
    reference = classifier(target).argmax(1)
    hits = (classifier(samples.flatten(0, 1)).argmax(1).view(b, n) == reference[:, None]).float()
    return {"class_best": hits.amax(1), "class_mean": hits.mean(1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the digit classifier of eval.classifier on clean MNIST.")
    parser.add_argument("--data-dir", default=os.environ.get("FUSIONVAE_DATA_DIR", "data"))
    parser.add_argument("--out", required=True, help="file to write (kept if it exists)")
    parser.add_argument("--pad", type=int, default=2, help="zero pixels around the 28x28 digits (dataset.pad)")
    args = parser.parse_args(argv)
    path, test_accuracy = ensure_classifier(args.data_dir, args.out, args.pad)
    print(f"{path}: clean MNIST test accuracy {test_accuracy:.4f}")


if __name__ == "__main__":
    main()
