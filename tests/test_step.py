"""``SkipSafeStep`` on a plain ``nn.Module`` (no Lightning): what the LightningModule relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fusionvae.errors import TooManySkippedSteps
from fusionvae.training.step import SkipSafeStep, StepContext


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("train_batches", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.bn(self.conv(x)).square().mean()


def context(step: int = 7) -> StepContext:
    return StepContext(backward=lambda loss: loss.backward(), all_ranks=bool, scaler=None, where=lambda: (step, "/ck"))


def setup(max_skips=2):
    torch.manual_seed(0)
    net = Net()
    engine = SkipSafeStep(net, max_skips)
    opt = torch.optim.Adamax([engine.flat_parameters()], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return net, engine, opt, sched


def test_a_good_step_updates_and_a_non_finite_one_leaves_everything_as_it_was():
    net, engine, opt, sched = setup()
    x = torch.rand(4, 1, 8, 8)
    engine.begin()
    norm = engine.finish(net(x), opt, sched, context())
    assert torch.isfinite(norm) and int(net.bn.num_batches_tracked) == 1
    state = {k: v.clone() for k, v in net.state_dict().items()}
    opt_state = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    engine.begin()
    norm = engine.finish(net(x) * float("nan"), opt, sched, context())
    assert torch.isnan(norm) and engine.consecutive_skips == 1 and int(net.skipped_steps) == 1
    for key, value in net.state_dict().items():  # BN statistics restored, weights untouched
        assert torch.equal(value, state[key]) or key == "skipped_steps", key
    assert all(torch.equal(v, opt.state_dict()["state"][0][k]) for k, v in opt_state.items())
    assert sched.last_epoch == 1 and torch.count_nonzero(engine.flat.grad) == 0
    engine.begin()
    engine.finish(net(x), opt, sched, context())
    assert engine.consecutive_skips == 0 and int(net.skipped_steps) == 1


def test_too_many_skips_in_a_row_stop_with_the_step_and_folder():
    net, engine, opt, sched = setup(max_skips=1)
    bad = net(torch.rand(2, 1, 8, 8)) * float("inf")
    engine.begin()
    engine.finish(bad, opt, sched, context())
    engine.begin()
    with pytest.raises(TooManySkippedSteps, match=r"^2 consecutive .* at step 7; the checkpoints in /ck are"):
        engine.finish(net(torch.rand(2, 1, 8, 8)) * float("inf"), opt, sched, context())


def test_clip_scales_the_flat_gradient_to_the_limit():
    net, engine, opt, sched = setup()
    engine.clip = 1e-4
    engine.begin()
    norm = engine.optimise(net(torch.rand(4, 1, 8, 8)), opt, sched, context())
    assert norm > 1e-3
    torch.testing.assert_close(torch.linalg.vector_norm(engine.flat.grad), torch.tensor(1e-4), rtol=1e-3, atol=0)
