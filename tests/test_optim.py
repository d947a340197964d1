"""fusionvae.training.optim: settings parsing, the warm-up / cosine multiplier at its edges and the
optimiser with its on-device schedule and skip mask that build_optimizer hands to Lightning."""

from __future__ import annotations

import math
import re

import pytest
import torch

from fusionvae.training.optim import OptimSettings, ScheduledAdamax, build_optimizer, warmup_cosine

LR, LR_MIN = 1e-2, 1e-4


def test_optim_settings_refuse_unknown_keys_naming_them_under_model_optim():
    message = (
        "unknown setting(s) model.optim.betas, model.optim.learning_rate; "
        "known: eps, lr, lr_min, warmup_epochs, weight_decay"
    )
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        OptimSettings.from_dict({"learning_rate": 1e-3, "betas": (0.9, 0.99), "lr": 1e-3})
    assert OptimSettings.from_dict({"lr": 3e-3}) == OptimSettings(lr=3e-3)
    assert OptimSettings.from_dict(None) == OptimSettings()


def test_warmup_ends_at_warmup_steps_with_the_full_rate():
    assert warmup_cosine(4, 5, 105, LR, LR_MIN) == 1.0  # last warm-up step: (4 + 1) / 5
    assert warmup_cosine(5, 5, 105, LR, LR_MIN) == pytest.approx(1.0, rel=1e-12)  # cosine at progress 0
    assert warmup_cosine(6, 5, 105, LR, LR_MIN) < 1.0


def test_cosine_over_a_single_step_reaches_lr_min():
    # total - warmup = 1: one step after the warm-up the cosine is done
    assert warmup_cosine(5, 5, 6, LR, LR_MIN) == pytest.approx(1.0, rel=1e-12)
    assert warmup_cosine(6, 5, 6, LR, LR_MIN) == pytest.approx(LR_MIN / LR, rel=1e-12)
    assert warmup_cosine(7, 5, 6, LR, LR_MIN) == pytest.approx(LR_MIN / LR, rel=1e-12)


def _param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(3))


def _lrs(opt, n: int) -> list[float]:
    p = opt.param_groups[0]["params"][0]
    out = []
    for _ in range(n):
        p.grad = torch.ones_like(p)
        opt.step(ok=torch.tensor(True))
        out.append(float(opt.last_lr))
    return out


def test_build_optimizer_returns_adamax_with_the_settings_and_a_per_step_schedule():
    settings = OptimSettings(lr=2e-2, lr_min=1e-3, eps=1e-3, weight_decay=3e-4, warmup_epochs=2)
    p = _param()
    opt = build_optimizer([p], settings, total_steps=100, epochs=4)
    assert isinstance(opt, ScheduledAdamax) and isinstance(opt, torch.optim.Adamax)
    group = opt.param_groups[0]
    assert group["params"] == [p] and (group["lr"], group["eps"], group["weight_decay"]) == (2e-2, 1e-3, 3e-4)
    # 2 of 4 epochs of 100 steps: a 50-step warm-up, then the cosine over the other 50
    lrs = _lrs(opt, 100)
    assert lrs[0] == pytest.approx(2e-2 / 50, rel=1e-12) and lrs[49] == pytest.approx(2e-2, rel=1e-12)
    assert lrs[75] == pytest.approx(1e-3 + 0.5 * (2e-2 - 1e-3) * (1 + math.cos(math.pi / 2)), rel=1e-12)


def test_updates_are_torch_adamax_and_a_masked_step_changes_nothing():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.zeros(64))
    with torch.no_grad():
        theirs.copy_(ours)
    settings = OptimSettings(lr=1e-2, lr_min=1e-2, eps=1e-3, weight_decay=3e-4, warmup_epochs=0)
    opt = build_optimizer([ours], settings, total_steps=10, epochs=1)  # a constant rate: torch's own schedule
    reference = torch.optim.Adamax([theirs], lr=1e-2, eps=1e-3, weight_decay=3e-4, foreach=True)
    for i in range(6):
        grad = torch.randn(64)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        if i == 3:  # a skipped step with NaN gradients: everything stays, the schedule too
            ours.grad.fill_(float("nan"))
            before = [ours.detach().clone()] + [v.clone() for v in opt.state[ours].values()]
            opt.step(ok=torch.tensor(False))
            after = [ours.detach()] + list(opt.state[ours].values())
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            ours.grad = grad.clone()
        opt.step(ok=torch.tensor(True))
        reference.step()
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert int(opt.steps_done()) == 6 and set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_inf"}


def test_a_loaded_step_count_moves_to_the_parameters_device():
    opt = build_optimizer([_param()], OptimSettings(), total_steps=10, epochs=1)
    state = opt.state_dict()
    state["state"] = {0: {"step": torch.tensor(4.0), "exp_avg": torch.zeros(3), "exp_inf": torch.zeros(3)}}
    opt.load_state_dict(state)  # a checkpoint of torch's Adamax (a CPU step count)
    assert opt.steps_done().dtype == torch.float32 and int(opt.steps_done()) == 4


def test_build_optimizer_eps_and_weight_decay_change_the_update():
    # one Adamax step from x = 1 with gradient g = 1e-3: weight decay adds 0.5 * x, eps bounds the norm
    p = _param()
    with torch.no_grad():
        p.fill_(1.0)
    opt = build_optimizer(
        [p], OptimSettings(lr=0.1, lr_min=0.1, eps=1.0, weight_decay=0.5, warmup_epochs=0), total_steps=10, epochs=1
    )
    p.grad = torch.full_like(p, 1e-3)
    opt.step()
    g = 1e-3 + 0.5  # gradient with weight decay
    m, u = (1 - 0.9) * g, max(0.0, g + 1.0)  # exp_avg, exp_inf = max(beta2 * 0, |g| + eps)
    expected = 1.0 - 0.1 / (1 - 0.9) * m / u
    torch.testing.assert_close(p.detach(), torch.full((3,), expected), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("warmup_epochs", "total_steps", "epochs", "first_lr"),
    [
        (0, 10, 1, LR),  # no warm-up asked: a one-step warm-up starts at the full rate
        (1, 1, 1, LR),  # one step in all: the warm-up is that step
        (1, 0, 1, LR),  # no steps reported: treated as one
        (1, 40, 0, LR / 40),  # zero epochs: treated as one
        (0.5, 40, 2, LR / 10),  # 0.5 of 2 epochs of 40 steps
    ],
)
def test_build_optimizer_warmup_length(warmup_epochs, total_steps, epochs, first_lr):
    settings = OptimSettings(lr=LR, lr_min=LR_MIN, warmup_epochs=warmup_epochs)
    opt = build_optimizer([_param()], settings, total_steps=total_steps, epochs=epochs)
    assert _lrs(opt, 1)[0] == pytest.approx(first_lr, rel=1e-12)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr": -1e-2}, "model.optim.lr must be a finite number > 0, got -0.01 (the default is model.optim.lr=0.01)"),
        ({"lr": 0}, "model.optim.lr must be a finite number > 0, got 0 (the default is model.optim.lr=0.01)"),
        ({"lr": math.nan}, "model.optim.lr must be a finite number > 0, got nan (the default is model.optim.lr=0.01)"),
        ({"lr": "abc"}, "model.optim.lr must be a float, got 'abc' (the default is model.optim.lr=0.01)"),
        (
            {"lr_min": -1},
            "model.optim.lr_min must be a finite number >= 0, got -1 (the default is model.optim.lr_min=0.0001)",
        ),
        (
            {"lr_min": math.inf},
            "model.optim.lr_min must be a finite number >= 0, got inf (the default is model.optim.lr_min=0.0001)",
        ),
        ({"eps": 0}, "model.optim.eps must be a finite number > 0, got 0 (the default is model.optim.eps=0.001)"),
    ],
)
def test_optim_settings_refuse_a_rate_the_optimiser_cannot_use(values, message):
    from fusionvae.errors import BadInputError

    with pytest.raises(BadInputError) as info:
        OptimSettings.from_dict(values)
    assert str(info.value) == message


def test_optim_settings_accept_a_schedule_to_zero_and_no_warmup():
    assert OptimSettings.from_dict({"lr_min": 0, "warmup_epochs": 0, "weight_decay": 0}).lr_min == 0
