"""``HostCopy``: a buffer's Python copy is re-read exactly when the buffer changed (in place, through
a flat buffer it lives in, by a state-dict load, or by a device move), else never."""

from __future__ import annotations

import torch
import torch.nn as nn

from fusionvae.model.host_copy import HostCopy
from fusionvae.model.layers import WNConv2d
from fusionvae.model.regularizers import SpectralPenalty
from fusionvae.training.flat import flat_buffers


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


def test_the_power_iteration_flag_is_read_again_after_the_step_that_set_it_and_then_never():
    """A step's buffer changes are put back through the flat buffer behind them, which their own
    tensors do not see; so the flag the first step sets is read again at the next step (the step
    may have been skipped), and from then on it is not read at all."""
    torch.manual_seed(0)
    net = nn.Sequential(WNConv2d(1, 2, 3), nn.BatchNorm2d(2))
    pen = SpectralPenalty(net, init_steps=3, steps=1)
    flat_buffers(list(pen.buffers()))  # as the step engine keeps them
    counts = []
    for _ in range(3):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            pen()
        counts.append(sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense"))
    assert counts == [1, 1, 0] and bool(pen.initialised)


def test_a_skipped_first_step_runs_the_initial_iterations_again():
    torch.manual_seed(0)
    net = nn.Sequential(WNConv2d(1, 2, 3), nn.BatchNorm2d(2))
    pen = SpectralPenalty(net, init_steps=3, steps=1)
    flag = flat_buffers([pen.initialised])[0]
    saved = flag.clone()
    pen()
    flag.copy_(saved)  # the engine puts the flag back: the step was skipped
    assert pen._initialised.get(pen.initialised) is False
