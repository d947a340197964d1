"""fusionvae.model.objective: settings parsing, K ranges, fp32 terms under autocast, unit conversion and
the KL schedule / balancing switch of the training loss (small hand-computed cases)."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

from fusionvae.model.objective import (
    LossSettings,
    Terms,
    compute_terms,
    k_range,
    kl_balance_alpha,
    kl_warmup,
    settings_from_dict,
    to_units,
    training_loss,
)

LOSS_KEYS = (
    "kl_balance, kl_min_beta, kl_warmup_portion, max_consecutive_skips, power_iter, power_iter_init, weight_decay_norm"
)


def test_loss_settings_refuse_unknown_keys_naming_them_under_model_loss():
    hint = "(did you mean kl_warmup_portion?)"
    message = f"unknown setting(s) model.loss.beta, model.loss.kl_warmup {hint}; known: {LOSS_KEYS}"
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        LossSettings.from_dict({"kl_warmup": 0.2, "beta": 1.0, "kl_balance": False})


def test_settings_from_dict_uses_the_given_key_and_accepts_none():
    with pytest.raises(ValueError, match=re.escape(f"unknown setting(s) cfg.loss.x; known: {LOSS_KEYS}") + "$"):
        settings_from_dict(LossSettings, {"x": 1}, "cfg.loss")
    assert settings_from_dict(LossSettings, None, "cfg.loss") == LossSettings()
    assert LossSettings.from_dict({"kl_balance": False, "power_iter": 3}) == LossSettings(
        kl_balance=False, power_iter=3
    )


@pytest.mark.parametrize(
    ("k_max", "stack", "expected"),
    [
        (2, (3, 5, 1, 4, 4), range(3)),  # k_max binds: K = 0, 1, 2 although the batch holds 4 views
        (9, (3, 4, 1, 4, 4), range(4)),  # the batch binds: 3 views (+ target) -> K = 0..3
        (3, (2, 4, 2, 4, 4), range(4)),  # both allow exactly 3
        (5, (2, 1, 3, 4, 4), range(1)),  # target only: K = 0
    ],
)
def test_k_range_is_zero_to_the_smaller_of_k_max_and_the_views(k_max, stack, expected):
    assert k_range(k_max, torch.zeros(stack)) == expected


class _MatmulLikelihood:
    """log p(x) = -(w . x) per pixel, through a matmul (an op CPU autocast runs in bfloat16)."""

    def __init__(self, w: torch.Tensor):
        self.w = w

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return -torch.matmul(x.permute(0, 2, 3, 1), self.w).view(b, h, w)


def test_compute_terms_keeps_likelihood_and_kl_in_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 8, 8, generator=g)
    views = torch.rand(2, 1, 3, 8, 8, generator=g)
    weight = torch.rand(3, 1, generator=g) + 0.1
    kl = torch.rand(2, 4, generator=g)
    seen = []

    def net(v, t):
        seen.append((v, t))
        return SimpleNamespace(likelihood=_MatmulLikelihood(weight), kl=kl.to(torch.bfloat16))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = compute_terms(net, views, target, crop=2)
    assert seen[0][0] is views and seen[0][1] is target and terms.target is target
    assert terms.nll.dtype == torch.float32 and terms.kl.dtype == torch.float32
    expected = (target.permute(0, 2, 3, 1) @ weight).view(2, 8, 8)[:, 2:-2, 2:-2].flatten(1).sum(1)
    # bfloat16 would round each pixel term by ~4e-3 relative; fp32 agrees to its own rounding
    torch.testing.assert_close(terms.nll, expected, rtol=1e-6, atol=0)
    assert torch.equal(terms.kl, kl.to(torch.bfloat16).float())
    torch.testing.assert_close(terms.nelbo, expected + terms.kl.sum(1), rtol=1e-6, atol=0)


def test_to_units_divides_by_central_dimensions_and_log2():
    nats = torch.tensor([100.0, 7.0])
    assert to_units(nats, torch.Size([4, 3, 16, 12]), crop=2, bits_per_dim=False) is nats
    # [3, 16 - 4, 12 - 4] = 288 central dimensions
    torch.testing.assert_close(
        to_units(nats, torch.Size([4, 3, 16, 12]), crop=2, bits_per_dim=True),
        nats / (288 * math.log(2)),
        rtol=1e-7,
        atol=0,
    )
    torch.testing.assert_close(
        to_units(nats, torch.Size([3, 16, 12]), crop=0, bits_per_dim=True),
        nats / (576 * math.log(2)),
        rtol=1e-7,
        atol=0,
    )


def test_kl_warmup_lasts_at_least_one_step():
    # 0.3 * 3 steps rounds down to 0: the warm-up still lasts one step, not two
    assert kl_warmup(0, 3, 0.3, 1e-4) == 1e-4
    assert kl_warmup(1, 3, 0.3, 1e-4) == 1.0
    assert kl_warmup(1, 10, 0.3, 1e-4) == 1 / 3  # int(3.0) = 3 steps
    assert kl_warmup(0, 10, 0.3, 0.05) == 0.05


def test_training_loss_skips_balancing_when_settings_turn_it_off():
    kl = torch.tensor([[1.0, 8.0, 3.0], [0.5, 2.0, 9.0]])
    nll = torch.tensor([10.0, 20.0])
    terms = Terms(nll, kl, torch.zeros(2, 1, 4, 4))
    alpha = kl_balance_alpha([1, 2])  # [1, 2, 2]: balancing would reweight the groups
    reg = torch.tensor(4.0)
    off = training_loss(terms, alpha, 0.5, LossSettings(kl_balance=False, weight_decay_norm=0.25), reg)
    # mean(nll + 0.5 * sum kl) + 0.25 * 4 = mean(16, 25.75) + 1
    assert off.item() == pytest.approx(21.875, rel=1e-7)
    on = training_loss(terms, alpha, 0.5, LossSettings(kl_balance=True, weight_decay_norm=0.25), reg)
    assert abs(on.item() - 21.875) > 0.1
