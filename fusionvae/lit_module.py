"""LightningModule: training with a random K per batch, per-K validation NELBO, Adamax schedule."""
from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from datamodules.sampling import mix

from .errors import TooManySkippedSteps
from .losses import balanced_kl, kl_balance_alpha, kl_warmup, warmup_cosine
from .network import FusionOutput, FusionVAE
from .regularizers import SpectralPenalty, batchnorm_penalty

DEFAULT_OPTIM = dict(lr=1e-2, lr_min=1e-4, eps=1e-3, weight_decay=3e-4, warmup_epochs=5)
DEFAULT_LOSS = dict(kl_warmup_portion=0.3, kl_min_beta=1e-4, kl_balance=True, weight_decay_norm=1e-2,
                    power_iter_init=10, power_iter=1, max_consecutive_skips=50)


class FusionVAEModule(L.LightningModule):
    """``net`` keyword arguments go to ``FusionVAE``. All arguments are primitives (numbers,
    strings, dicts of them), saved as hyperparameters so that checkpoints load with Lightning's
    default ``weights_only=True``."""

    def __init__(
        self,
        optim: dict | None = None,
        loss: dict | None = None,
        k_max: int = 3,
        crop: int = 0,
        bits_per_dim: bool = False,
        seed: int = 0,
        **net,
    ):
        super().__init__()
        if k_max < 0:
            raise ValueError(f"k_max must be >= 0 (number of input views), got {k_max}")
        if crop < 0:
            raise ValueError(f"crop must be >= 0, got {crop}")
        self.save_hyperparameters()
        self.optim_cfg = {**DEFAULT_OPTIM, **(optim or {})}
        self.loss_cfg = {**DEFAULT_LOSS, **(loss or {})}
        self.net = FusionVAE(**net)
        self.spectral = SpectralPenalty(self.net, self.loss_cfg["power_iter_init"], self.loss_cfg["power_iter"])
        self.register_buffer("kl_alpha", kl_balance_alpha(self.net.groups_decoder_order), persistent=False)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("train_batches", torch.zeros((), dtype=torch.long))
        self.consecutive_skips = 0  # saved in checkpoints by on_save_checkpoint
        self.automatic_optimization = False

    # ---- data helpers -------------------------------------------------------------------------
    def split(self, batch: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``k`` noisy views and the target of a ``[B, V + 1, C, H, W]`` stack."""
        available = batch.shape[1] - 1
        if not 0 <= k <= available:
            raise ValueError(f"K={k} views requested but the batch holds {available}; K must be in [0, {available}]")
        return batch[:, available - k : available], batch[:, -1]

    def draw_k(self) -> int:
        """K ~ U{0..k_max}, identical on all DDP ranks and reproducible from (seed, batch count)."""
        g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + int(self.train_batches))
        return int(torch.randint(0, self.hparams.k_max + 1, (1,), generator=g))

    def log_likelihood(self, out: FusionOutput, target: torch.Tensor) -> torch.Tensor:
        """log p(y | z) in nats, summed over the central (uncropped) pixels: ``[B]``."""
        lp = out.likelihood.log_prob(target)
        c = self.hparams.crop
        if c:
            lp = lp[:, c:-c, c:-c]
        return lp.flatten(1).sum(1)

    def to_units(self, nats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Nats per image, or bits per dimension when ``bits_per_dim``."""
        if not self.hparams.bits_per_dim:
            return nats
        c, h, w = target.shape[1:]
        dims = c * (h - 2 * self.hparams.crop) * (w - 2 * self.hparams.crop)
        return nats / (dims * math.log(2))

    def nelbo(self, batch: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-item negative log-likelihood term ``[B]``, KL ``[B, L]`` (fp32) and the target."""
        views, target = self.split(batch, k)
        out = self.net(views, target)
        with torch.autocast(self.device.type, enabled=False):
            return -self.log_likelihood(out, target), out.kl.float(), target

    # ---- training -----------------------------------------------------------------------------
    def regulariser(self) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=False):
            return self.spectral() + batchnorm_penalty(self.net)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        """One batch. Its randomness (K, posterior noise) is a function of (seed, batch count,
        rank), so a resumed run repeats it. A step with a non-finite loss or gradient is skipped
        (see ``_optimise``)."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        k = self.draw_k()
        torch.manual_seed(mix(self.hparams.seed, int(self.train_batches), self.global_rank))
        self.train_batches += 1
        state = self._state_buffers()
        saved = [b.clone() for b in state]  # BN statistics, power-iteration vectors: restored if skipped
        recon, kl, target = self.nelbo(batch, k)
        beta = kl_warmup(self.global_step, self.trainer.estimated_stepping_batches,
                         self.loss_cfg["kl_warmup_portion"], self.loss_cfg["kl_min_beta"])
        kl_weighted, _ = balanced_kl(kl, self.kl_alpha, beta, self.loss_cfg["kl_balance"])
        reg = self.regulariser()
        loss = (recon + kl_weighted).mean() + self.loss_cfg["weight_decay_norm"] * reg
        grad_norm = self._optimise(loss, opt, sched)
        if grad_norm is None:
            self._skip(state, saved, opt)
            grad_norm = torch.tensor(float("nan"))
        else:
            self.consecutive_skips = 0

        nelbo = self.to_units(recon + kl.sum(1), target).mean()
        self.log_dict({
            "train/loss": loss.detach(), "train/nelbo": nelbo.detach(), "train/kl": kl.sum(1).mean().detach(),
            "train/recon": recon.mean().detach(), "train/reg": reg.detach(), "train/beta": beta,
            "train/grad_norm": grad_norm, "train/k": float(k), "train/skipped_steps": self.skipped_steps.float(),
        }, prog_bar=False, on_step=True, on_epoch=False, batch_size=batch.shape[0])
        self.log("nelbo", nelbo.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)

    def _all_ranks(self, ok: torch.Tensor) -> bool:
        return self.trainer.strategy.reduce_boolean_decision(bool(ok), all=True)

    def _optimise(self, loss: torch.Tensor, opt, sched) -> torch.Tensor | None:
        """Backward and step; the gradient norm, or None when the step is skipped.

        Skipped: the loss or the gradient norm is non-finite on any rank. Then neither the
        optimiser nor the LR scheduler steps, so ``global_step`` (optimiser steps), the LR
        schedule and the KL warm-up (a function of ``global_step``) all count successful steps
        only. With a GradScaler (fp16) a non-finite gradient lowers the loss scale instead."""
        if not self._all_ranks(torch.isfinite(loss)):
            return None
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.parameters() if p.grad is not None])
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if not self._all_ranks(torch.isfinite(grad_norm)):
            if scaler is not None:  # records the inf, then backs the scale off (no step)
                scaler.unscale_(opt.optimizer)
                scaler.update()
            return None
        opt.step()
        sched.step()
        return grad_norm / scaler.get_scale() if scaler is not None else grad_norm

    def _state_buffers(self) -> list[torch.Tensor]:
        """Every buffer a forward pass may change (BN running stats and counts, power-iteration
        u / v); not the skip / batch counters."""
        return [b for name, b in self.named_buffers() if name not in ("skipped_steps", "train_batches")]

    def _skip(self, state: list[torch.Tensor], saved: list[torch.Tensor], opt) -> None:
        """Undo what the skipped forward pass changed; stop after too many skips in a row."""
        torch._foreach_copy_(state, saved)
        opt.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.consecutive_skips += 1
        limit = self.loss_cfg["max_consecutive_skips"]
        if limit is not None and self.consecutive_skips > limit:
            folder = getattr(self.trainer.checkpoint_callback, "dirpath", None) or "the checkpoints folder"
            raise TooManySkippedSteps(
                f"{self.consecutive_skips} consecutive training steps had a non-finite loss or gradients "
                f"(limit model.loss.max_consecutive_skips={limit}) at step {self.global_step}; the checkpoints "
                f"in {folder} are from before them: lower model.optim.lr or check the data, then resume")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        wandb_ids = [lg.version for lg in (self._trainer.loggers if self._trainer else []) if isinstance(lg, WandbLogger)]
        checkpoint["fusionvae"] = {"consecutive_skips": int(self.consecutive_skips),
                                   "wandb_id": str(wandb_ids[0]) if wandb_ids and wandb_ids[0] else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.consecutive_skips = int(checkpoint.get("fusionvae", {}).get("consecutive_skips", 0))

    # ---- evaluation ---------------------------------------------------------------------------
    def _eval_step(self, batch: torch.Tensor, prefix: str) -> None:
        per_k = []
        for k in range(self.hparams.k_max + 1):
            recon, kl, target = self.nelbo(batch, k)
            value = self.to_units(recon + kl.sum(1), target).mean()
            per_k.append(value)
            self.log(f"{prefix}/nelbo_k{k}", value, sync_dist=True, batch_size=batch.shape[0])
        self.log(f"{prefix}/nelbo", torch.stack(per_k).mean(), sync_dist=True, prog_bar=True, batch_size=batch.shape[0])

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @torch.no_grad()
    def sample(self, views: torch.Tensor, t: float = 1.0, mean_image: bool = False) -> torch.Tensor:
        """Images ``[B, C, H, W]`` from p(y | x): z at temperature ``t``; the likelihood's mean
        image when ``mean_image`` (use with t = 0 for the "mean" prediction), else a sample."""
        out = self.net(views, None, t=t)
        with torch.autocast(self.device.type, enabled=False):
            return out.likelihood.mean() if mean_image else out.likelihood.sample()

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.optim_cfg
        opt = torch.optim.Adamax(self.parameters(), lr=cfg["lr"], eps=cfg["eps"], weight_decay=cfg["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup = max(1, int(cfg["warmup_epochs"] * total / epochs))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, warmup, total, cfg["lr"], cfg["lr_min"]))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
