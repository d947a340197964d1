"""LightningModule: training with a random K per batch, per-K validation NELBO, Adamax schedule.

The objective itself lives in ``fusionvae.objective``, the optimiser and its schedule in
``fusionvae.optim``, sampling in ``fusionvae.sampling``; this module wires them into Lightning and
owns the skip policy for non-finite steps.
"""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from datamodules.sampling import mix

from .compile import compile_network
from .errors import TooManySkippedSteps
from .flat import flat_buffers, flat_parameters, is_flat, zero_gradients
from .network import FusionVAE, NetworkConfig
from .objective import (
    LossSettings,
    Terms,
    compute_terms,
    kl_balance_alpha,
    kl_warmup,
    split_views,
    to_units,
    training_loss,
)
from .optim import OptimSettings, build_optimizer
from .regularizers import SpectralPenalty, batchnorm_penalty


class FusionVAEModule(L.LightningModule):
    """``net`` keyword arguments go to ``FusionVAE``; ``optim`` and ``loss`` are checked against
    ``OptimSettings`` / ``LossSettings`` (unknown keys are refused). All arguments are primitives
    (numbers, strings, dicts of them), saved as hyperparameters so that checkpoints load with
    Lightning's default ``weights_only=True``."""

    kwargs_go_to = NetworkConfig  # what ``**net`` accepts (fusionvae.settings.declared_arguments)

    def __init__(
        self,
        optim: dict | None = None,
        loss: dict | None = None,
        k_max: int = 3,
        crop: int = 0,
        bits_per_dim: bool = False,
        seed: int = 0,
        compile: bool = False,
        compile_mode: str = "default",
        **net,
    ):
        super().__init__()
        if k_max < 0:
            raise ValueError(f"model.k_max must be >= 0 (number of input views), got {k_max}")
        if crop < 0:
            raise ValueError(f"model.crop must be >= 0, got {crop}")
        # explicit, not read from this frame: the same hparams however __init__ is wrapped (mutmut, subclasses).
        # Every network setting, defaults included: a checkpoint without aggregation_level is one
        # written before it existed (network.legacy_overrides)
        config = NetworkConfig(**net)
        net = asdict(config)
        self.save_hyperparameters(
            dict(
                optim=optim,
                loss=loss,
                k_max=k_max,
                crop=crop,
                bits_per_dim=bits_per_dim,
                seed=seed,
                compile=compile,
                compile_mode=compile_mode,
                **net,
            ),
            logger=False,  # in checkpoints only: loggers get the whole config once (fusionvae.run_log), not these twice
        )
        self.optim_settings = OptimSettings.from_dict(optim)
        self.loss_settings = LossSettings.from_dict(loss)
        self.net = FusionVAE(config)
        self.spectral = SpectralPenalty(self.net, self.loss_settings.power_iter_init, self.loss_settings.power_iter)
        self.register_buffer("kl_alpha", kl_balance_alpha(self.net.groups_decoder_order), persistent=False)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("train_batches", torch.zeros((), dtype=torch.long))
        self.consecutive_skips = 0  # saved in checkpoints by on_save_checkpoint
        self._flat_params: torch.nn.Parameter | None = None  # backs every parameter and gradient
        self._flat_state: list[torch.Tensor] = []  # back the buffers a forward pass may change
        self._saved_state: list[torch.Tensor] = []  # their copies, restored on a skipped step
        self.gradient_clip_val: float | None = None  # trainer.gradient_clip_val, set by instantiate.build
        self.automatic_optimization = False

    def configure_model(self) -> None:
        """``model.compile``: torch.compile the network in place, once (``fusionvae.compile``)."""
        if self.hparams.compile:
            compile_network(
                self.net, self.hparams.compile_mode, self.trainer.strategy.root_device.type, self.hparams.k_max
            )

    # ---- the objective on a batch -------------------------------------------------------------
    def draw_k(self) -> int:
        """K ~ U{0..k_max}, identical on all DDP ranks and reproducible from (seed, batch count)."""
        g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + int(self.train_batches))
        return int(torch.randint(0, self.hparams.k_max + 1, (1,), generator=g))

    def terms(self, batch: torch.Tensor, k: int, prior_sigma: bool = False) -> Terms:
        """NLL and KL per item for the last ``k`` views of ``batch`` (one posterior draw)."""
        views, target = split_views(batch, k)
        return compute_terms(self.net, views, target, self.hparams.crop, prior_sigma)

    def units(self, nats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Nats per image, or bits per dimension when ``bits_per_dim``."""
        return to_units(nats, target.shape, self.hparams.crop, self.hparams.bits_per_dim)

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
        state = self._save_state()
        self.spectral.start_step()
        terms = self.terms(batch, k)
        settings = self.loss_settings
        beta = kl_warmup(
            self.global_step, self.trainer.estimated_stepping_batches, settings.kl_warmup_portion, settings.kl_min_beta
        )
        reg = self.regulariser()
        loss = training_loss(terms, self.kl_alpha, beta, settings, reg)
        grad_norm = self._optimise(loss, opt, sched)
        if grad_norm is None:
            self._skip(state, opt)
            grad_norm = torch.tensor(float("nan"))
        else:
            self.consecutive_skips = 0
        self._log_training(terms, loss, reg, beta, grad_norm, k)

    def _log_training(self, terms: Terms, loss, reg, beta: float, grad_norm, k: int) -> None:
        nelbo = self.units(terms.nelbo, terms.target).mean().detach()
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/nelbo": nelbo,
                "train/kl": terms.kl.sum(1).mean().detach(),
                "train/recon": terms.nll.mean().detach(),
                "train/reg": reg.detach(),
                "train/beta": beta,
                "train/grad_norm": grad_norm,
                "train/k": float(k),
                "train/skipped_steps": self.skipped_steps.float(),
            },
            prog_bar=False,
            on_step=True,
            on_epoch=False,
            batch_size=terms.target.shape[0],
        )
        self.log("nelbo", nelbo, prog_bar=True, on_step=True, on_epoch=False, logger=False)

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
        self._zero_grad(opt)
        self.manual_backward(loss)
        grad_norm = self._grad_norm()
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if not self._all_ranks(torch.isfinite(grad_norm)):
            if scaler is not None:  # records the inf, then backs the scale off (no step)
                scaler.unscale_(opt.optimizer)
                scaler.update()
            return None
        if scaler is not None:  # the gradients are scaled; Lightning unscales them in opt.step()
            grad_norm = grad_norm / scaler.get_scale()
        self._clip(grad_norm)  # a factor on the (scaled) gradients: the same either way
        opt.step()
        sched.step()
        return grad_norm

    def _clip(self, grad_norm: torch.Tensor) -> None:
        """Scale all gradients to norm ``gradient_clip_val`` when above it (``trainer.gradient_clip_val``;
        Lightning's own clipping is not available under manual optimisation)."""
        if not self.gradient_clip_val:
            return
        scale = (self.gradient_clip_val / (grad_norm + 1e-6)).clamp(max=1.0)
        if self._flat_params is not None:
            self._flat_params.grad.mul_(scale)  # one op for every gradient
        else:
            torch._foreach_mul_([p.grad for p in self.parameters() if p.grad is not None], scale)

    def _zero_grad(self, opt) -> None:
        if self._flat_params is None:  # an optimiser not from configure_optimizers
            opt.zero_grad(set_to_none=True)
        else:  # the gradients are views of one flat buffer: one op, and keep them linked
            zero_gradients(self, self._flat_params)

    def _grad_norm(self) -> torch.Tensor:
        flat = self._flat_params
        if flat is not None and is_flat(flat.grad, [p.grad for p in self.parameters()]):
            return torch.linalg.vector_norm(flat.grad)  # one op over every gradient
        return torch.nn.utils.get_total_norm([p.grad for p in self.parameters() if p.grad is not None])

    def _save_state(self) -> list[torch.Tensor]:
        """Copy every buffer a forward pass may change (BN running stats and counts,
        power-iteration u / v; not the skip / batch counters), kept in one flat buffer per dtype,
        so saving is a copy or two; returns those flat buffers for ``_skip``."""
        state = [b for name, b in self.named_buffers() if name not in ("skipped_steps", "train_batches")]
        if not self._flat_state or not all(any(is_flat(f, [b]) for f in self._flat_state) for b in state):
            self._flat_state = flat_buffers(state)
            self._saved_state = [torch.empty_like(f) for f in self._flat_state]
        torch._foreach_copy_(self._saved_state, self._flat_state)
        return self._flat_state

    def _skip(self, state: list[torch.Tensor], opt) -> None:
        """Undo what the skipped forward pass changed; stop after too many skips in a row."""
        torch._foreach_copy_(state, self._saved_state)
        self._zero_grad(opt)
        self.skipped_steps += 1
        self.consecutive_skips += 1
        limit = self.loss_settings.max_consecutive_skips
        if limit is not None and self.consecutive_skips > limit:
            folder = getattr(self.trainer.checkpoint_callback, "dirpath", None) or "the checkpoints folder"
            raise TooManySkippedSteps(
                f"{self.consecutive_skips} consecutive training steps had a non-finite loss or gradients "
                f"(limit model.loss.max_consecutive_skips={limit}) at step {self.global_step}; the checkpoints "
                f"in {folder} are from before them: lower model.optim.lr or check the data, then resume"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        wandb_ids = [
            lg.version for lg in (self._trainer.loggers if self._trainer else []) if isinstance(lg, WandbLogger)
        ]
        checkpoint["fusionvae"] = {
            "consecutive_skips": int(self.consecutive_skips),
            "wandb_id": str(wandb_ids[0]) if wandb_ids and wandb_ids[0] else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.consecutive_skips = int(checkpoint.get("fusionvae", {}).get("consecutive_skips", 0))
        state = checkpoint.get("state_dict", {})
        if any(key.startswith("net.dec_cells.") for key in state):  # written before LatentGroup
            # convs are ordered differently now: start the power iteration afresh (init_steps)
            for key, value in self.spectral.state_dict().items():
                state[f"spectral.{key}"] = torch.zeros_like(value) if key == "initialised" else value

    # ---- validation and test: one posterior draw per item ------------------------------------
    def _eval_step(self, batch: torch.Tensor, prefix: str) -> None:
        """``<prefix>/nelbo_k<K>`` for every K and their mean ``<prefix>/nelbo`` (one posterior draw
        at the trainer's precision; ``evaluate.py`` reports the fp32 S-sample estimates as ``eval/``).

        The fusion diagnostic per K: ``<prefix>/kl_k<K>``, KL(q || p) summed over the groups (in the
        NELBO's units), and ``<prefix>/prior_sigma_k<K>``, the prior's mean sigma. When the views
        inform the prior, both fall as K grows."""
        per_k = []
        for k in range(self.hparams.k_max + 1):
            terms = self.terms(batch, k, prior_sigma=True)
            value = self.units(terms.nelbo, terms.target).mean()
            per_k.append(value)
            diagnostic = {
                f"{prefix}/nelbo_k{k}": value,
                f"{prefix}/kl_k{k}": self.units(terms.kl.sum(1), terms.target).mean(),
                f"{prefix}/prior_sigma_k{k}": terms.prior_sigma.mean(),
            }
            self.log_dict(diagnostic, sync_dist=True, batch_size=batch.shape[0])
        self.log(f"{prefix}/nelbo", torch.stack(per_k).mean(), sync_dist=True, prog_bar=True, batch_size=batch.shape[0])

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        # the model is on its device by now; object.__setattr__: not a registered parameter of its own
        object.__setattr__(self, "_flat_params", flat_parameters(self))
        return build_optimizer(
            [self._flat_params], self.optim_settings, self.trainer.estimated_stepping_batches, epochs
        )
