"""``HostCopy``: a buffer's Python copy is re-read exactly when the buffer changed (in place, through
a flat buffer it lives in, by a state-dict load, or by a device move), else never."""

from __future__ import annotations

import torch

from fusionvae.model.host_copy import HostCopy
from fusionvae.training.step import SkipSafeStep


def reads(copy: HostCopy, t: torch.Tensor) -> tuple[object, int]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        value = copy.get(t)
    return value, sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense")


def test_read_once_then_only_after_a_change():
    t, copy = torch.tensor(3), HostCopy()
    assert reads(copy, t) == (3, 1) and reads(copy, t) == (3, 0)
    t += 1  # changed by code that does not tell the copy
    assert reads(copy, t) == (4, 1)
    t += 1
    copy.set(t, 5)  # changed by code that does
    assert reads(copy, t) == (5, 0)
    t.copy_(torch.tensor(9))  # a state-dict load copies in place
    assert reads(copy, t) == (9, 1)
    assert reads(copy, t.clone()) == (9, 1)  # another tensor (a device move)


def test_a_skipped_step_makes_the_copies_read_again():
    """The skip restores buffers through the flat buffer behind them, which their own tensors do
    not see (their version is not the flat buffer's): SkipSafeStep.skip forgets every copy."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    net.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
    net.register_buffer("flag", torch.tensor(False))
    net.copy = HostCopy()
    engine = SkipSafeStep(net, None)
    opt = torch.optim.SGD([engine.flat_parameters()], lr=0.1)
    engine.begin()  # the flag is saved as False
    net.flag.fill_(True)  # the forward pass sets it
    net.copy.set(net.flag, True)
    engine.skip(opt, 0, None)
    assert bool(net.flag) is False and reads(net.copy, net.flag) == (False, 1)
