"""``SkipSafeStep`` on a plain ``nn.Module`` (no Lightning): what the LightningModule relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fusionvae.errors import TooManySkippedSteps
from fusionvae.training.host_waits import HostWaits
from fusionvae.training.optim import OptimSettings, build_optimizer
from fusionvae.training.step import SkipSafeStep, StepContext


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("train_batches", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.bn(self.conv(x)).square().mean()


def context() -> StepContext:
    return StepContext(backward=lambda loss: loss.backward(), all_ranks=lambda ok: ok, scaler=None)


def setup(max_skips=2):
    torch.manual_seed(0)
    net = Net()
    engine = SkipSafeStep(net, max_skips)
    opt = build_optimizer([engine.flat_parameters()], OptimSettings(lr=0.1, warmup_epochs=0), total_steps=10, epochs=1)
    return net, engine, opt


def step(net, engine, opt, x, poison: float = 1.0) -> torch.Tensor:
    engine.begin()
    return engine.finish(net(x) * poison, opt, context())


def test_a_good_step_updates_and_a_non_finite_one_leaves_everything_as_it_was():
    net, engine, opt = setup()
    x = torch.rand(4, 1, 8, 8)
    norm = step(net, engine, opt, x)
    assert torch.isfinite(norm) and int(net.bn.num_batches_tracked) == 1 and int(opt.steps_done()) == 1
    state = {k: v.clone() for k, v in net.state_dict().items()}
    opt_state = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    for poison in (float("nan"), float("inf")):
        norm = step(net, engine, opt, x, poison)
        assert torch.isnan(norm)
        for key, value in net.state_dict().items():  # BN statistics put back, weights untouched
            assert torch.equal(value, state[key]) or key == "skipped_steps", key
        assert all(torch.equal(v, opt.state_dict()["state"][0][k]) for k, v in opt_state.items())  # schedule too
    assert engine.consecutive_skips == 2 and int(net.skipped_steps) == 2
    step(net, engine, opt, x)
    assert engine.consecutive_skips == 0 and int(net.skipped_steps) == 2 and int(opt.steps_done()) == 2
    assert not torch.equal(net.conv.weight, state["conv.weight"])


def test_a_skipped_step_reads_nothing_from_the_device():
    net, engine, opt = setup()
    step(net, engine, opt, torch.rand(4, 1, 8, 8))
    with HostWaits() as waits:
        step(net, engine, opt, torch.rand(4, 1, 8, 8), float("nan"))
        step(net, engine, opt, torch.rand(4, 1, 8, 8))
    assert waits.ops == []


def test_too_many_skips_in_a_row_stop_with_the_step_and_folder_when_checked():
    net, engine, opt = setup(max_skips=1)
    step(net, engine, opt, torch.rand(2, 1, 8, 8), float("inf"))
    engine.check_skips(6, "/ck")  # one skip: within the limit
    step(net, engine, opt, torch.rand(2, 1, 8, 8), float("inf"))
    step(net, engine, opt, torch.rand(2, 1, 8, 8))  # a good step ends the run, but the run is remembered
    with pytest.raises(TooManySkippedSteps, match=r"^2 consecutive .* found at step 8; the checkpoints in /ck are"):
        engine.check_skips(8, "/ck")
    engine.check_skips(9, "/ck")  # checked: a new run of skips is counted from here


def test_no_limit_never_stops():
    net, engine, opt = setup(max_skips=None)
    for _ in range(3):
        step(net, engine, opt, torch.rand(2, 1, 8, 8), float("nan"))
    engine.check_skips(3, None)
    assert engine.consecutive_skips == 3


def test_clip_scales_the_flat_gradient_to_the_limit():
    net, engine, opt = setup()
    engine.clip = 1e-4
    norm = step(net, engine, opt, torch.rand(4, 1, 8, 8))
    assert norm > 1e-3
    torch.testing.assert_close(torch.linalg.vector_norm(engine.flat.grad), torch.tensor(1e-4), rtol=1e-3, atol=0)
