"""LightningModule: training with a random K per batch, per-K validation NELBO, Adamax schedule.

The objective itself lives in ``fusionvae.model.objective``, the optimiser and its schedule in
``fusionvae.training.optim``, sampling in ``fusionvae.model.sampling``, the optimiser step with its skip policy for
non-finite steps in ``fusionvae.training.step``; this module wires them into Lightning.
"""

from __future__ import annotations

import functools
from dataclasses import asdict

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from datamodules.training_order import mix
from fusionvae.model.host_copy import HostCopy
from fusionvae.model.network import FusionVAE
from fusionvae.model.network_config import NetworkConfig
from fusionvae.model.objective import (
    LossSettings,
    Terms,
    compute_terms,
    kl_balance_alpha,
    kl_warmup,
    split_views,
    to_units,
    training_loss,
)
from fusionvae.model.regularizers import BatchNormPenalty, SpectralPenalty
from fusionvae.training.compile import compile_network
from fusionvae.training.optim import OptimSettings, build_optimizer
from fusionvae.training.step import SkipSafeStep, StepContext
from fusionvae.training.step_graph import StepGraphs, check_step_graphs


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
            logger=False,  # in checkpoints only: loggers get the whole config once (training.run_log), not twice
        )
        self.optim_settings = OptimSettings.from_dict(optim)
        self.loss_settings = LossSettings.from_dict(loss)
        self.net = FusionVAE(config)
        self.spectral = SpectralPenalty(self.net, self.loss_settings.power_iter_init, self.loss_settings.power_iter)
        self.bn_penalty = BatchNormPenalty(self.net)
        self.register_buffer("kl_alpha", kl_balance_alpha(self.net.groups_decoder_order), persistent=False)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("train_batches", torch.zeros((), dtype=torch.long))
        self._batches = HostCopy()
        self.step_engine = SkipSafeStep(self, self.loss_settings.max_consecutive_skips)
        self.step_graphs: StepGraphs | None = None  # model.compile_mode=reduce-overhead (configure_model)
        self.automatic_optimization = False

    def configure_model(self) -> None:
        """``model.compile``: torch.compile the network's cells in place, once
        (``fusionvae.training.compile``); with ``model.compile_mode=reduce-overhead`` also the
        training step's CUDA graphs (``fusionvae.training.step_graph``)."""
        if self.hparams.compile:
            device_type = self.trainer.strategy.root_device.type
            compile_network(self.net, self.hparams.compile_mode, device_type, self.hparams.k_max)
            if self.hparams.compile_mode == "reduce-overhead" and self.step_graphs is None:
                check_step_graphs(device_type, self.trainer.world_size, self._step_context().scaler)
                self.step_graphs = StepGraphs()

    # ---- the objective on a batch -------------------------------------------------------------
    def draw_k(self) -> int:
        """K ~ U{0..k_max}, identical on all DDP ranks and reproducible from (seed, batch count).

        It is ``torch.randint(0, k_max + 1, generator=torch.Generator().manual_seed(s))``, the draw
        of earlier versions, computed without a tensor: the first 32-bit output of the Mersenne
        Twister that ``manual_seed(s)`` seeds (numpy's legacy seeding is the same), modulo
        ``k_max + 1``. Reading a tensor's value into Python is a host sync, even on the CPU."""
        seed = (self.hparams.seed * 1_000_003 + self.batches_done()) & 0xFFFF_FFFF
        first = int(np.random.RandomState(seed).randint(0, 2**32, dtype=np.uint32))
        return first % (self.hparams.k_max + 1)

    def batches_done(self) -> int:
        """Training batches begun so far (the ``train_batches`` buffer, without a device read per step)."""
        return self._batches.get(self.train_batches)

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
            return self.spectral() + self.bn_penalty()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        """One batch. Its randomness (K, posterior noise) is a function of (seed, batch count,
        rank), so a resumed run repeats it. The host part (K, the seed, logging) is here; the
        device part (``_device_step``) runs eagerly or, with ``model.compile_mode=reduce-overhead``,
        from a CUDA graph per K. A step with a non-finite loss or gradient is skipped
        (``fusionvae.training.step``), decided on the device; the host reads the run of skips at
        logging steps only."""
        opt = self.optimizers()
        k = self.draw_k()
        done = self.batches_done()
        torch.manual_seed(mix(self.hparams.seed, done, self.global_rank))
        self.spectral.start_step()
        step = functools.partial(self._device_step, k=k, opt=opt)
        if self.step_graphs is None:
            logged = step(batch)
        else:  # keyed by every host value the device step's Python branches on
            key = (k, tuple(batch.shape), self.spectral.first_step())
            logged, replayed = self.step_graphs.run(key, batch, step)
            if replayed:  # its update ran in the graph: Lightning counts the step and runs its hooks
                opt.step(update=False)
        self._batches.set(self.train_batches, done + 1)
        self.log_dict(
            {**logged, "train/k": float(k)}, prog_bar=False, on_step=True, on_epoch=False, batch_size=batch.shape[0]
        )
        # no prog_bar=True here: Lightning reads every progress-bar value after every batch (a host
        # sync); the progress bar shows train/nelbo at logging steps (training.callbacks.ProgressBar)
        if self.trainer._logger_connector.should_update_logs:  # logging steps read device values anyway
            self._check_skips()

    def _device_step(self, batch: torch.Tensor, k: int, opt) -> dict[str, torch.Tensor]:
        """Forward, backward and the optimiser step; the values to log. Device work only, on one
        Python path per K, batch shape and power-iteration start, so that it can be captured in a
        CUDA graph."""
        self.train_batches += 1
        self.step_engine.begin()
        terms = self.terms(batch, k)
        settings = self.loss_settings
        steps_done = opt.optimizer.steps_done()  # successful steps: skipped ones do not advance the warm-up
        beta = kl_warmup(
            steps_done, self.trainer.estimated_stepping_batches, settings.kl_warmup_portion, settings.kl_min_beta
        )
        reg = self.regulariser()
        loss = training_loss(terms, self.kl_alpha, beta, settings, reg)
        grad_norm = self.step_engine.finish(loss, opt, self._step_context())
        return {
            "train/loss": loss.detach(),
            "train/nelbo": self.units(terms.nelbo, terms.target).mean().detach(),
            "train/kl": terms.kl.sum(1).mean().detach(),
            "train/recon": terms.nll.mean().detach(),
            "train/reg": reg.detach(),
            "train/beta": beta,
            "train/lr": opt.optimizer.last_lr,
            "train/grad_norm": grad_norm,
            "train/skipped_steps": self.skipped_steps.float(),
        }

    def _all_ranks(self, ok: torch.Tensor) -> torch.Tensor:
        """``ok`` and every other rank's, on the device (Lightning's reduce_boolean_decision reads
        it into Python, and its reduce adds a barrier: both wait for the GPU)."""
        if self.trainer.world_size == 1 or not dist.is_initialized():
            return ok
        flag = ok.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag.bool()

    def _check_skips(self) -> None:
        self.step_engine.check_skips(self.global_step, getattr(self.trainer.checkpoint_callback, "dirpath", None))

    def _step_context(self) -> StepContext:
        return StepContext(
            backward=self.manual_backward,
            all_ranks=self._all_ranks,
            scaler=getattr(self.trainer.precision_plugin, "scaler", None),
        )

    def on_train_end(self) -> None:
        self._check_skips()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            self._check_skips()  # no checkpoint of a run past the skip limit
        wandb_ids = [
            lg.version for lg in (self._trainer.loggers if self._trainer else []) if isinstance(lg, WandbLogger)
        ]
        checkpoint["fusionvae"] = {
            "consecutive_skips": int(self.step_engine.consecutive_skips),
            "wandb_id": str(wandb_ids[0]) if wandb_ids and wandb_ids[0] else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.step_engine.consecutive_skips = int(checkpoint.get("fusionvae", {}).get("consecutive_skips", 0))
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
        # the model is on its device by now
        flat = self.step_engine.flat_parameters()
        return build_optimizer([flat], self.optim_settings, self.trainer.estimated_stepping_batches, epochs)
