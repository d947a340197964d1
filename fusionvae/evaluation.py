"""Checkpoint evaluation per K (DESIGN.md section 3), behind ``evaluate.py``.

For every K in 0..k_max, on the fixed validation / test set (``trainer.limit_test_batches`` takes
a subset), in eval mode and fp32 (autocast off):

- ``nelbo``: -log p(y|z) + sum_l KL(q || p), averaged over the S posterior draws below;
- ``iw_nll``: -[logsumexp_s (log p(y|z_s) + log p(z_s|x) - log q(z_s|x,y)) - log S] with
  z_s ~ q(z | x, y), S = ``eval.iw_samples``, drawn ``eval.iw_chunk`` at a time from one encoder
  pass each (``repeats``) so memory stays bounded; both in nats (MNIST, central crop) or bits/dim;
- ``{mse,psnr,ssim}_{best,mean}``: best-of-N and mean-of-N over N = ``eval.num_samples`` images
  decoded from z ~ p(z | x) at ``eval.sample_temperature`` against the target (central crop).
  For a deterministic net (FCN) every draw is the same, so S = 1 (and N = 1 with mean images) is
  used: the values are identical and exact.

The metrics run inside Lightning's test loop (device, loggers and ``limit_test_batches`` come from
the trainer config; the trainer's precision is forced to fp32 by conf/evaluate.yaml), are logged as
``test/<metric>_k<K>`` and written with ``fusionvae.report`` to metrics.json / .csv / .md and a
metric-vs-K plot. Then image grids per K at ``eval.temperatures`` (t = 0: the mean image),
optionally with BN statistics re-adjusted per temperature (``eval.bn_readjust``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid, save_image

from .bn_readjust import readjust_bn
from .errors import BadInputError
from .instantiate import build, finish
from .lit_module import FusionVAEModule
from .metrics import log_mean_exp, sample_metrics
from .report import describe_model, write_report
from .resume import check_dataset, read_checkpoint, resolve_ckpt_path

DECODE_MODES = ("mean", "sample")


@dataclass
class EvalSettings:
    """The ``eval`` config node (conf/evaluate.yaml; dataset-specific values in conf/eval/)."""

    iw_samples: int = 1000  # S importance samples per item (paper: 1000 MNIST, 100 RGB)
    iw_chunk: int = 100  # samples per forward pass: a pass holds batch * iw_chunk images
    num_samples: int = 10  # N samples from p(z | x) per item for best-of-N / mean-of-N
    sample_temperature: float = 1.0
    decode: str = "mean"  # image of a z: the likelihood's mean (NVAE's choice) or a sample of it
    temperatures: tuple = (0.0, 0.6, 0.8, 1.0)  # grid columns; t = 0 is the mean image
    grid_images: int = 8  # rows (items) per grid; 0: no grids
    grid_samples: int = 1  # samples per temperature t > 0 in the grids
    bn_readjust: bool = False  # re-estimate BN statistics per grid temperature first
    bn_readjust_batches: int = 20

    def __post_init__(self):
        for name in ("iw_samples", "iw_chunk", "num_samples", "grid_samples", "bn_readjust_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.grid_images < 0:
            raise ValueError(f"eval.grid_images must be >= 0, got {self.grid_images}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"eval.decode must be one of {', '.join(DECODE_MODES)}, got '{self.decode}'")
        if self.sample_temperature < 0 or any(t < 0 for t in self.temperatures):
            raise ValueError("temperatures must be >= 0")
        self.temperatures = tuple(float(t) for t in self.temperatures)

    @classmethod
    def from_cfg(cls, node) -> "EvalSettings":
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown eval settings: {', '.join(sorted(unknown))}")
        return cls(**values)


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield min(size, total - start)


@torch.no_grad()
def importance_weighted(module: FusionVAEModule, views: torch.Tensor, target: torch.Tensor, samples: int,
                        chunk: int) -> dict[str, torch.Tensor]:
    """IW-NLL and NELBO in nats per item ``[B]`` from ``samples`` posterior draws, ``chunk`` per pass."""
    b = target.shape[0]
    log_w, nelbo = [], target.new_zeros(b, dtype=torch.float32)
    with torch.autocast(target.device.type, enabled=False):
        views, target = views.float(), target.float()
        for c in _chunks(samples, chunk):
            out = module.net(views, target, repeats=c)
            log_px = module.log_likelihood(out, target.repeat_interleave(c, dim=0))  # [B * c]
            log_w.append((log_px + out.log_p.float() - out.log_q.float()).view(b, c))
            nelbo += (-log_px + out.kl.float().sum(1)).view(b, c).sum(1)
    return {"iw_nll": -log_mean_exp(torch.cat(log_w, dim=1).double(), dim=1).float(), "nelbo": nelbo / samples}


@torch.no_grad()
def draw_samples(module: FusionVAEModule, views: torch.Tensor, n: int, t: float = 1.0, decode: str = "mean",
                 chunk: int | None = None) -> torch.Tensor:
    """``n`` images per item ``[B, n, C, H, W]`` decoded from z ~ p(z | x) at temperature ``t``."""
    b = views.shape[0]
    parts = []
    with torch.autocast(views.device.type, enabled=False):
        for c in _chunks(n, chunk or n):
            lik = module.net(views.float(), None, t=t, repeats=c).likelihood
            images = lik.mean() if decode == "mean" else lik.sample()
            parts.append(images.view(b, c, *images.shape[1:]))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def evaluate_batch(module: FusionVAEModule, batch: torch.Tensor, k: int, settings: EvalSettings) -> dict[str, torch.Tensor]:
    """All metrics per item ``[B]`` for K = ``k`` views (NELBO / IW-NLL in the module's units)."""
    views, target = module.split(batch, k)
    # a deterministic net (FCN: log q = log p = 0) gives the same weight for every draw: one is exact
    stochastic = module.net.stochastic
    iw = importance_weighted(module, views, target, settings.iw_samples if stochastic else 1, settings.iw_chunk)
    out = {name: module.to_units(value, target) for name, value in iw.items()}
    n = settings.num_samples if stochastic or settings.decode == "sample" else 1  # mean images of one z: alike
    samples = draw_samples(module, views, n, settings.sample_temperature, settings.decode, settings.iw_chunk)
    out.update(sample_metrics(samples, target, crop=module.hparams.crop))
    return out


class Evaluator(L.LightningModule):
    """Runs ``evaluate_batch`` for every K in Lightning's test loop; logs per-K means
    ``test/<metric>_k<K>`` (and ``test/nelbo``, ``test/iw_nll``: means over K) at the end."""

    def __init__(self, module: FusionVAEModule, settings: EvalSettings):
        super().__init__()
        self.module = module
        self.settings = settings
        self._sums: dict[str, torch.Tensor] = {}

    def on_test_epoch_start(self) -> None:
        self._sums = {}

    def _add(self, key: str, values: torch.Tensor) -> None:
        total = values.double().sum()
        self._sums[key] = self._sums.get(key, torch.zeros((), dtype=torch.float64, device=values.device)) + total

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        batch = batch.float()
        for k in range(min(self.module.hparams.k_max, batch.shape[1] - 1) + 1):
            for name, values in evaluate_batch(self.module, batch, k, self.settings).items():
                self._add(f"{name}_k{k}", values)
            self._add(f"count_k{k}", torch.full((batch.shape[0],), 1.0, device=batch.device))

    def on_test_epoch_end(self) -> None:
        keys = sorted(self._sums)
        if not keys:
            return
        totals = torch.stack([self._sums[k] for k in keys])
        if self.trainer.world_size > 1:
            totals = self.all_gather(totals).sum(0)
        sums = dict(zip(keys, totals.tolist()))
        metrics = {}
        for key, value in sums.items():
            if key.startswith("count_k"):
                continue
            metrics[f"test/{key}"] = value / sums[f"count_k{key.rsplit('_k', 1)[1]}"]
        ks = sorted({int(k.rsplit("_k", 1)[1]) for k in keys})
        for name in ("nelbo", "iw_nll"):
            metrics[f"test/{name}"] = sum(metrics[f"test/{name}_k{k}"] for k in ks) / len(ks)
        self.log_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in metrics.items()}, sync_dist=False)
        self.results = metrics


# ---- image grids --------------------------------------------------------------------------------
@torch.no_grad()
def temperature_columns(module: FusionVAEModule, views: torch.Tensor, t: float, grid_samples: int = 1) -> torch.Tensor:
    """``[B, n, C, H, W]``: the mean image at t = 0, else ``grid_samples`` samples at temperature t."""
    with torch.autocast(views.device.type, enabled=False):
        if t == 0:
            return module.net(views.float(), None, t=0.0).likelihood.mean().unsqueeze(1)
        return draw_samples(module, views, grid_samples, t, decode="sample")


@torch.no_grad()
def sample_grid(modules: dict[float, FusionVAEModule], batch: torch.Tensor, k: int, grid_samples: int = 1) -> torch.Tensor:
    """One row per item: k_max input slots (unused blank), target, then the columns of each
    temperature (``modules`` maps t to the, possibly BN re-adjusted, model). ``[C', H', W']``."""
    any_module = next(iter(modules.values()))
    views, target = any_module.split(batch, k)
    slots = batch.shape[1] - 1
    cols = [torch.zeros_like(batch[:, : slots - k]), views, target.unsqueeze(1)]
    cols += [temperature_columns(m, views, t, grid_samples) for t, m in modules.items()]
    rows = torch.cat([c.float().cpu() for c in cols], dim=1)
    if not torch.isfinite(rows).all():
        raise FloatingPointError(f"non-finite pixels in the K={k} sample grid (temperatures {list(modules)})")
    return make_grid(rows.flatten(0, 1), nrow=rows.shape[1], padding=1, pad_value=0.5)


def write_grids(module: FusionVAEModule, loader, settings: EvalSettings, out_dir: Path, device) -> list[Path]:
    """Grids ``grid_k<K>.png`` for K = 0..k_max on the first ``grid_images`` test items."""
    if settings.grid_images == 0:
        return []
    module = module.to(device).eval()
    batch = next(iter(loader))[: settings.grid_images].to(device, torch.float32)
    modules = {}
    for t in settings.temperatures:
        modules[t] = readjust_bn(module, loader, t, settings.bn_readjust_batches, device) if settings.bn_readjust else module
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(min(module.hparams.k_max, batch.shape[1] - 1) + 1):
        grid = sample_grid(modules, batch, k, settings.grid_samples)
        paths.append(out_dir / f"grid_k{k}.png")
        save_image(grid, paths[-1])
    return paths


def _log_grids(trainer: L.Trainer, paths: list[Path]) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
    from torchvision.io import read_image

    for logger in trainer.loggers:
        for path in paths:
            if isinstance(logger, WandbLogger):
                logger.log_image(f"eval/{path.stem}", [str(path)])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"eval/{path.stem}", read_image(str(path)), 0)


# ---- entry point --------------------------------------------------------------------------------
def load_model(ckpt_path: str) -> FusionVAEModule:
    """The module of a checkpoint; one-line ``FusionVAEError`` if it is missing or damaged."""
    read_checkpoint(ckpt_path)  # cheap (memory-mapped): clear errors before Lightning's loader
    return FusionVAEModule.load_from_checkpoint(Path(ckpt_path), map_location="cpu")


def checkpoint_to_evaluate(cfg: DictConfig) -> tuple[Path, FusionVAEModule]:
    """``cfg.ckpt_path`` (``last``: the newest training run's last.ckpt) and its module, checked
    against the dataset config before any data is prepared."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise BadInputError("evaluate.py needs a checkpoint: add ckpt_path=<run dir>/checkpoints/last.ckpt "
                            "(or ckpt_path=last for the newest training run)")
    path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir, "train")
    model = load_model(str(path))
    check_dataset(model.hparams, cfg.dataset, path)
    return path, model


def run_evaluation(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.ckpt_path`` per K; write metrics.{json,csv,md}, metrics_vs_k.png and grids to
    ``cfg.paths.output_dir``; return the ``test/...`` metrics."""
    settings = EvalSettings.from_cfg(cfg.get("eval"))
    ckpt_path, model = checkpoint_to_evaluate(cfg)
    datamodule, _, trainer = build(cfg)
    evaluator = Evaluator(model, settings)
    out_dir = Path(cfg.paths.output_dir)
    start = time.time()
    try:
        trainer.test(evaluator, datamodule=datamodule)
        results = {k: float(v) for k, v in getattr(evaluator, "results", {}).items()}
        seconds = time.time() - start
        if trainer.is_global_zero:
            info = {
                "ckpt_path": str(ckpt_path),
                "units": "bits/dim" if model.hparams.bits_per_dim else "nats",
                "model": describe_model(model.hparams, str(ckpt_path)),
                "eval": {**asdict(settings), "temperatures": list(settings.temperatures)},
                "test_batches": trainer.num_test_batches[0] if trainer.num_test_batches else None,
                "seconds": round(seconds, 1),
            }
            write_report(results, info, out_dir)
            paths = write_grids(model, datamodule.test_dataloader(), settings, out_dir / "images", trainer.strategy.root_device)
            _log_grids(trainer, paths)
    finally:
        finish(trainer)
    return results
