"""Checkpoint evaluation per K (docs/design.md §3), behind ``evaluate.py``.

For every K in 0..k_max, on the fixed validation / test set (``trainer.limit_test_batches`` takes
a subset), in eval mode and fp32 (autocast off):

- ``nelbo``: -log p(y|z) + sum_l KL(q || p), averaged over the S posterior draws below;
- ``iw_nll``: -[logsumexp_s (log p(y|z_s) + log p(z_s|x) - log q(z_s|x,y)) - log S] with
  z_s ~ q(z | x, y), S = ``eval.iw_samples``, drawn ``eval.iw_chunk`` at a time from one encoder
  pass each (``repeats``) so memory stays bounded; both in nats (MNIST, central crop) or bits/dim;
- ``<metric>_{best,mean}`` for every metric of ``metrics.IMAGE_METRICS``: best-of-N and mean-of-N
  over N = ``eval.num_samples`` images decoded from z ~ p(z | x) at ``eval.sample_temperature``
  against the target (central crop), and those samples' ``diversity``; with ``eval.classifier``
  also ``class_{best,mean}`` (``fusionvae.evaluation.classifier``). For a deterministic net (FCN)
  every draw is the same, so S = 1 (and N = 1 with mean images) is used: the values are identical and exact.

The fusion diagnostic per K: ``kl``, KL(q || p) summed over the groups and averaged over the S
draws, and ``prior_sigma``, the prior's mean sigma (``FusionOutput.prior_sigma``).

Results are kept per K (``{K: {metric: mean}}`` with standard errors over items) and per item
(``per_item``: ``{K: {metric: [N]}}``, written as ``per_item.csv`` so that same-item differences can
be paired later), logged as ``eval/<metric>_k<K>`` (``train.py test=true`` logs its one-draw
NELBO as ``test/``, a different estimator). The job behind ``evaluate.py`` (loading the
checkpoint, reports, grids) is ``fusionvae.jobs.evaluate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from fusionvae.errors import BadInputError
from fusionvae.evaluation.classifier import load as load_classifier
from fusionvae.evaluation.classifier import semantic_metrics
from fusionvae.evaluation.metrics import log_mean_exp, sample_metrics
from fusionvae.model.network_config import NetworkConfig
from fusionvae.model.objective import k_range, log_likelihood, split_views
from fusionvae.model.sampling import DECODE_MODES, draw
from fusionvae.training.module import FusionVAEModule


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
    classifier: str | None = None  # fusionvae.evaluation.classifier file: adds class_best / class_mean

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
    def from_cfg(cls, node) -> EvalSettings:
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown eval settings: {', '.join(sorted(unknown))}")
        return cls(**values)


@torch.no_grad()
def importance_weighted(
    module: FusionVAEModule, views: torch.Tensor, target: torch.Tensor, samples: int, chunk: int
) -> dict[str, torch.Tensor]:
    """IW-NLL, NELBO and KL in nats per item ``[B]`` from ``samples`` posterior draws, ``chunk`` per
    pass, and the prior's mean sigma averaged over the draws."""
    b, crop = target.shape[0], module.hparams.crop
    log_w, nelbo = [], target.new_zeros(b, dtype=torch.float32)
    kl, sigma = torch.zeros_like(nelbo), torch.zeros_like(nelbo)
    with torch.autocast(target.device.type, enabled=False):
        views, target = views.float(), target.float()
        for start in range(0, samples, chunk):
            c = min(chunk, samples - start)
            out = module.net(views, target, repeats=c)
            log_px = log_likelihood(out.likelihood, target.repeat_interleave(c, dim=0), crop)  # [B * c]
            log_w.append((log_px + out.log_p.float() - out.log_q.float()).view(b, c))
            kl_c = out.kl.float().sum(1)
            nelbo += (-log_px + kl_c).view(b, c).sum(1)
            kl += kl_c.view(b, c).sum(1)
            sigma += out.prior_sigma.view(b, c).sum(1)
    iw_nll = -log_mean_exp(torch.cat(log_w, dim=1).double(), dim=1).float()
    return {"iw_nll": iw_nll, "nelbo": nelbo / samples, "kl": kl / samples, "prior_sigma": sigma / samples}


@torch.no_grad()
def evaluate_batch(
    module: FusionVAEModule,
    batch: torch.Tensor,
    k: int,
    settings: EvalSettings,
    classifier: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """All metrics per item ``[B]`` for K = ``k`` views (NELBO / IW-NLL in the module's units; with
    a ``classifier``, its semantic metrics)."""
    views, target = split_views(batch, k)
    # a deterministic net (FCN: log q = log p = 0) gives the same weight for every draw: one is exact
    stochastic = module.net.stochastic
    iw = importance_weighted(module, views, target, settings.iw_samples if stochastic else 1, settings.iw_chunk)
    sigma = iw.pop("prior_sigma")
    out = {name: module.units(value, target) for name, value in iw.items()}
    out["prior_sigma"] = sigma
    n = settings.num_samples if stochastic or settings.decode == "sample" else 1  # mean images of one z: alike
    samples = draw(module.net, views, n, settings.sample_temperature, settings.decode, settings.iw_chunk)
    out.update(sample_metrics(samples, target, crop=module.hparams.crop))
    if classifier is not None:
        out.update(semantic_metrics(classifier, samples, target))
    return out


class Evaluator(L.LightningModule):
    """Runs ``evaluate_batch`` for every K in Lightning's test loop. ``results`` is
    ``{K: {metric: mean}}``, ``stderr`` ``{K: {metric: standard error over items}}`` and
    ``per_item`` ``{K: {metric: [N] values in item order}}`` after the loop; all gathered over ranks."""

    def __init__(self, module: FusionVAEModule, settings: EvalSettings):
        super().__init__()
        self.module = module
        self.settings = settings
        # a submodule, so Lightning moves it to the evaluation device with the model
        self.classifier, self.classifier_accuracy = (
            load_classifier(settings.classifier) if settings.classifier else (None, None)
        )
        if self.classifier is not None:
            check_classifier(self.classifier, module.hparams, settings.classifier)
        self.results: dict[int, dict[str, float]] = {}
        self.stderr: dict[int, dict[str, float]] = {}
        self.items = 0  # test items evaluated (per K)
        self.per_item: dict[int, dict[str, torch.Tensor]] = {}
        self._sums: dict[int, dict[str, torch.Tensor]] = {}  # K -> metric -> [count, sum, sum of squares]
        self._values: dict[int, dict[str, list[torch.Tensor]]] = {}  # K -> metric -> per-batch values

    def on_test_epoch_start(self) -> None:
        self._sums, self._values = {}, {}

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        batch = batch.float()
        for k in k_range(self.module.hparams.k_max, batch):
            sums, kept = self._sums.setdefault(k, {}), self._values.setdefault(k, {})
            for name, values in evaluate_batch(self.module, batch, k, self.settings, self.classifier).items():
                v = values.double()
                kept.setdefault(name, []).append(v.detach())
                moments = torch.stack(
                    [torch.tensor(float(v.numel()), dtype=torch.float64, device=v.device), v.sum(), v.pow(2).sum()]
                )
                sums[name] = sums[name] + moments if name in sums else moments

    def totals(self) -> tuple[list[tuple[int, str]], torch.Tensor]:
        """This rank's ``(K, metric)`` keys and their ``[count, sum, sum of squares]`` rows."""
        keys = [(k, name) for k in sorted(self._sums) for name in sorted(self._sums[k])]
        return keys, torch.stack([self._sums[k][name] for k, name in keys]) if keys else torch.zeros(0, 3)

    def on_test_epoch_end(self) -> None:
        keys, totals = self.totals()
        if not keys:
            return
        if self.trainer.world_size > 1:
            totals = self.all_gather(totals).sum(0)
        for (k, name), (count, total, squares) in zip(keys, totals.tolist()):
            mean = total / count
            variance = max(squares / count - mean * mean, 0.0) * count / max(count - 1, 1)
            self.results.setdefault(k, {})[name] = mean
            self.stderr.setdefault(k, {})[name] = math.sqrt(variance / count)
            self.items = int(count)
        self.per_item = self._gather_items()
        self.log_dict(
            {
                f"eval/{name}_k{k}": torch.tensor(v, dtype=torch.float32)
                for k, row in self.results.items()
                for name, v in row.items()
            },
            sync_dist=False,
        )

    def _gather_items(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every rank's per-item values on the CPU in dataset order. Lightning's test sampler deals
        item i to rank i % world_size, so interleaving the ranks' values restores the order."""
        out = {}
        for k, metrics in self._values.items():
            for name, chunks in metrics.items():
                values = torch.cat(chunks)
                if self.trainer.world_size > 1:
                    values = self.all_gather(values).t().flatten()  # [world, n] -> item order
                out.setdefault(k, {})[name] = values.cpu()
        return out


def check_classifier(classifier, hparams, path) -> None:
    """Refuse a classifier made for other images than the model's, before any data is read."""
    got = (classifier.config["channels"], classifier.config["size"])
    net = NetworkConfig.from_hparams(hparams)
    want = (net.channels, net.image_size)
    if got != want:
        raise BadInputError(
            f"eval.classifier={path} classifies {got[0]}x{got[1]}x{got[1]} images, the model makes "
            f"{want[0]}x{want[1]}x{want[1]}: use a classifier for this dataset or eval.classifier=null"
        )
