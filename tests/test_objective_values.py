"""Value-level checks of the training objective, the validation NELBO, the LR schedule and the
non-finite-step skip, against formulas written out here (tiny model, fixed random batches).

Each Lightning step is replayed by hand from the state recorded before it and the global RNG
state recorded at the start of every network forward (z is drawn from torch's global RNG, however
the module seeds it), so the numbers must agree to float32 rounding.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision.amp import MixedPrecision
from torch.utils.data import DataLoader

from fusionvae.model.objective import balanced_kl, kl_balance_alpha
from fusionvae.training.module import FusionVAEModule
from fusionvae.training.optim import warmup_cosine
from tests.test_network import TINY

CROP = 2
VIEWS = 3
LR, LR_MIN = 1e-2, 1e-4
EPOCHS, BATCHES, BATCH = 2, 3, 4  # 6 optimiser steps
WARMUP_PORTION, MIN_BETA, LAMBDA = 0.5, 1e-4, 0.5
# float32 rounding of a ~5000-nat loss: sums taken in another order differ by ~1e-3 nats; every
# effect guarded below (a KL term, a beta factor, a KL-balancing weight) is several nats
RTOL = 1e-6


def make_module(**kw) -> FusionVAEModule:
    torch.manual_seed(0)
    return FusionVAEModule(
        **{
            **TINY,
            "crop": CROP,
            "seed": 5,
            "optim": dict(lr=LR, lr_min=LR_MIN, warmup_epochs=1),
            "loss": dict(kl_warmup_portion=WARMUP_PORTION, kl_min_beta=MIN_BETA, weight_decay_norm=LAMBDA),
            **kw,
        }
    )


def items(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(VIEWS + 1, 1, 32, 32, generator=g) for _ in range(n)]


def trainer(callbacks=(), **kw) -> L.Trainer:
    kw = {"limit_val_batches": 0, **kw}
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kw,
    )


class ForwardRng:
    """torch's global RNG state at the start of every forward of ``net``, in call order."""

    def __init__(self, net: torch.nn.Module):
        self.states: list[torch.Tensor] = []
        net.register_forward_pre_hook(lambda module, args: self.states.append(torch.get_rng_state()))


@contextmanager
def replaying(net: torch.nn.Module, states: list[torch.Tensor]):
    """Run forwards of ``net`` from the recorded RNG states, one per call, in order."""
    pending = iter(list(states))
    handle = net.register_forward_pre_hook(lambda module, args: torch.set_rng_state(next(pending)))
    try:
        yield
    finally:
        handle.remove()
    assert next(pending, None) is None, "fewer forwards than recorded"


# ---- formulas, written out --------------------------------------------------------------------
def alpha_formula(groups_decoder_order: list[int]) -> torch.Tensor:
    """alpha_l = 4^i / (groups at scale i), i = 0 at the top scale, divided by the smallest."""
    alpha = torch.tensor(
        [4.0**i / n for i, n in enumerate(groups_decoder_order) for _ in range(n)], dtype=torch.float64
    )
    return alpha / alpha.min()


def gamma_formula(kl: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """gamma_l proportional to (batch mean |KL_l| + 0.01) / alpha_l, with mean 1."""
    g = (kl.double().abs().mean(0) + 0.01) / alpha.double()
    return g / g.mean()


def beta_formula(step: int, total: int) -> float:
    warm = max(1, int(WARMUP_PORTION * total))
    return max(min(step / warm, 1.0), MIN_BETA)


def lr_formula(step: int, total: int, epochs: int = EPOCHS) -> float:
    """Adamax LR after ``step`` scheduler steps of ``total`` over ``epochs``: linear warm-up over
    warmup_epochs = 1 epoch, then a cosine from LR to LR_MIN."""
    warmup = total // epochs
    if step < warmup:
        return LR * (step + 1) / warmup
    return LR_MIN + 0.5 * (LR - LR_MIN) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def next_lr(opt) -> float:
    """The rate the optimiser's next step will use (its schedule at its step count)."""
    return float(opt.schedule[2] * warmup_cosine(opt.steps_done(), *opt.schedule))


def hand_terms(m: FusionVAEModule, batch: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p(y|z) over the central crop ``[B]`` and the KL per group ``[B, L]``, in float64."""
    views, target = batch[:, VIEWS - k : VIEWS], batch[:, VIEWS]
    out = m.net(views, target)
    log_px = out.likelihood.log_prob(target)[:, CROP:-CROP, CROP:-CROP].double().sum((1, 2))
    return -log_px, out.kl.double()


# ---- KL balancing -----------------------------------------------------------------------------
@pytest.mark.parametrize("order", [[1, 2], [2, 4, 8], [3, 3]])
def test_kl_balance_alpha_is_four_to_the_scale_over_groups(order):
    torch.testing.assert_close(kl_balance_alpha(order).double(), alpha_formula(order))


def test_balanced_kl_divides_by_alpha_and_weights_by_beta():
    g = torch.Generator().manual_seed(0)
    kl = torch.rand(5, 3, generator=g) * torch.tensor([2.0, 6.0, 6.0])
    alpha = kl_balance_alpha([1, 2])  # [1, 2, 2]
    weighted, gamma = balanced_kl(kl, alpha, beta=0.25)
    torch.testing.assert_close(gamma.double(), gamma_formula(kl, alpha), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        weighted.double(), 0.25 * (kl.double() * gamma_formula(kl, alpha)).sum(1), rtol=1e-6, atol=0
    )
    # equal KL per group: the weights are exactly inversely proportional to alpha
    _, even = balanced_kl(torch.ones(4, 3), alpha, beta=0.5)
    torch.testing.assert_close(even, torch.tensor([1.0, 1 / 2, 1 / 2]) / (2 / 3))
    # no reweighting once beta reaches 1, or with balancing off
    for beta, balance in ((1.0, True), (0.25, False)):
        w, ones = balanced_kl(kl, alpha, beta=beta, balance=balance)
        torch.testing.assert_close(w, beta * kl.sum(1))
        assert torch.equal(ones, torch.ones(3))


# ---- one training run, replayed step by step ----------------------------------------------------
class StepRecorder(L.Callback):
    """State and batch before each step, the RNG states of its forwards; logged values and LR after it."""

    def __init__(self, forwards: ForwardRng):
        self.forwards = forwards
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(
            dict(
                state={k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                first=len(self.forwards.states),
                batch=batch.detach().clone(),
                step=trainer.global_step,
            )
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rec = self.steps[-1]
        rec.update(
            logged={k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")},
            lr_used=float(trainer.optimizers[0].last_lr),
            lr_next=next_lr(trainer.optimizers[0]),
            rng=self.forwards.states[rec["first"] :],
        )


@pytest.fixture(scope="module")
def run():
    model = make_module()
    recorder = StepRecorder(ForwardRng(model.net))
    t = trainer([recorder], max_epochs=EPOCHS, limit_train_batches=BATCHES)
    t.fit(model, DataLoader(items(BATCHES * BATCH), batch_size=BATCH))
    assert len(recorder.steps) == EPOCHS * BATCHES and int(model.skipped_steps) == 0
    return model, recorder.steps


def test_training_loss_is_nll_plus_beta_balanced_kl_plus_lambda_reg(run):
    model, steps = run
    total = EPOCHS * BATCHES
    seen_k, seen_beta = set(), set()
    for i, rec in enumerate(steps):
        hand = FusionVAEModule(**model.hparams)
        hand.load_state_dict(rec["state"])
        hand.train()
        k = hand.draw_k()  # the module's own reproducible draw, from the recorded batch count
        assert rec["logged"]["train/k"] == k
        beta = beta_formula(rec["step"], total)
        assert rec["step"] == i and rec["logged"]["train/beta"] == pytest.approx(beta, rel=1e-6)
        with torch.no_grad(), replaying(hand.net, rec["rng"]):
            recon, kl = hand_terms(hand, rec["batch"], k)
            reg = hand.regulariser().double()
        gamma = gamma_formula(kl, alpha_formula(hand.net.groups_decoder_order)) if beta < 1 else torch.ones(kl.shape[1])
        expected = (recon + beta * (kl * gamma).sum(1)).mean() + LAMBDA * reg
        assert rec["logged"]["train/loss"] == pytest.approx(expected.item(), rel=RTOL), (i, k, beta)
        assert rec["logged"]["train/recon"] == pytest.approx(recon.mean().item(), rel=RTOL)
        assert rec["logged"]["train/kl"] == pytest.approx(kl.sum(1).mean().item(), rel=1e-5)
        assert rec["logged"]["train/reg"] == pytest.approx(reg.item(), rel=1e-5)
        seen_k.add(k)
        seen_beta.add(beta)
    # the run covers the balanced warm-up (beta < 1, KL well above the tolerance) and beta = 1
    assert {MIN_BETA, 1 / 3, 2 / 3, 1.0} <= seen_beta and len(seen_k) >= 2
    # and parameters really moved (a step was taken)
    assert not torch.equal(steps[0]["state"]["net.top_state"], steps[-1]["state"]["net.top_state"])


def test_learning_rate_follows_warmup_then_cosine(run):
    _, steps = run
    total = EPOCHS * BATCHES
    for i, rec in enumerate(steps):
        assert rec["lr_used"] == pytest.approx(lr_formula(i, total), rel=1e-9), i
        assert rec["lr_next"] == pytest.approx(lr_formula(i + 1, total), rel=1e-9), i
    assert steps[-1]["lr_next"] == pytest.approx(LR_MIN, rel=1e-9)  # the cosine ends at lr_min


# ---- validation NELBO ---------------------------------------------------------------------------
class Batches(L.Callback):
    def __init__(self):
        self.batches = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.batches.append(batch.detach().clone())


def test_val_nelbo_per_k_is_nll_plus_kl_item_weighted_over_unequal_batches():
    model = make_module()
    rec, forwards = Batches(), ForwardRng(model.net)
    logged = trainer([rec], limit_val_batches=None).validate(
        model, DataLoader(items(5, seed=1), batch_size=3), verbose=False
    )[0]
    assert [b.shape[0] for b in rec.batches] == [3, 2]
    per_k = {k: [] for k in range(VIEWS + 1)}
    with torch.no_grad(), replaying(model.eval().net, forwards.states):
        for batch in rec.batches:
            for k in range(VIEWS + 1):  # _eval_step's order: K = 0..k_max
                recon, kl = hand_terms(model, batch, k)
                per_k[k].append(recon + kl.sum(1))
    means = {k: torch.cat(v).mean().item() for k, v in per_k.items()}
    for k, value in means.items():
        assert logged[f"val/nelbo_k{k}"] == pytest.approx(value, rel=RTOL), k
    assert logged["val/nelbo"] == pytest.approx(sum(means.values()) / len(means), rel=RTOL)


# ---- finite loss, non-finite gradient -----------------------------------------------------------
def _nan_gradient_run(plugins=()):
    model = make_module()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers() if n not in ("skipped_steps", "train_batches")}
    model.net.top_state.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    logged = []
    cb = L.Callback()
    cb.on_train_batch_end = lambda tr, *a: logged.append({k: float(v) for k, v in tr.callback_metrics.items()})
    t = trainer([cb], max_epochs=1, limit_train_batches=2, plugins=list(plugins))
    t.fit(model, DataLoader(items(8), batch_size=BATCH))
    # a skipped step leaves every other state alone: BN statistics, power-iteration vectors,
    # the optimiser's step count (hence the KL warm-up and the LR schedule)
    for name, b in model.named_buffers():
        assert name not in buffers or torch.equal(b, buffers[name]), name
    assert int(t.optimizers[0].steps_done()) == 0 and t.global_step == 2  # global_step counts batches
    assert next_lr(t.optimizers[0]) == pytest.approx(lr_formula(0, 2, epochs=1), rel=1e-9)
    return model, t, before, logged


def test_finite_loss_with_nan_gradient_skips_the_step():
    model, t, before, logged = _nan_gradient_run()
    assert [math.isfinite(s["train/loss"]) for s in logged] == [True, True]
    assert all(math.isnan(s["train/grad_norm"]) for s in logged)
    assert int(model.skipped_steps) == 2 and [s["train/skipped_steps"] for s in logged] == [1.0, 2.0]
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert all(not v.any() for v in t.optimizers[0].state[model.step_engine.flat].values())  # Adamax never stepped


def test_grad_scaler_skips_a_nan_gradient_step_and_backs_off():
    """fp16 autocast with torch.amp.GradScaler("cpu"): the scaler itself skips the step."""
    model, t, before, logged = _nan_gradient_run([MixedPrecision("16-mixed", "cpu")])
    scaler = t.precision_plugin.scaler
    assert isinstance(scaler, torch.amp.GradScaler)
    assert int(model.skipped_steps) == 2 and all(math.isfinite(s["train/loss"]) for s in logged)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert all(not v.any() for v in t.optimizers[0].state[model.step_engine.flat].values())
    assert scaler.get_scale() == scaler._init_scale * scaler.get_backoff_factor() ** 2  # backed off once per step
