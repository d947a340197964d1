"""Flags or-ed over the DDP ranks, so that every rank takes the same decision (saving a checkpoint is
a collective; a stop signal may reach one rank only).

``agree_now`` waits for the answer: the host waits for every rank and, on a GPU, for the work it
has queued (use it where the host waits anyway, e.g. in validation). ``LaggedFlags`` answers one
exchange late, so a training batch end never waits for the GPU: ``send`` starts the all-reduce
of this batch's flags (after the step's work in the stream) and copies the result into
page-locked host memory; ``received`` at the next batch end waits for that copy only, by when the
GPU has gone on to the step queued since. Reading the result at once would make the host wait
for every step to finish before queuing the next one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def agree_now(device: torch.device, *flags: bool) -> list[bool]:
    """``flags`` or-ed over the ranks (of the default process group), waiting for the answer."""
    values = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


class LaggedFlags:
    """``send(flags)`` at one batch end, ``received()`` at the next: what all ranks sent then,
    or-ed (all False before the first ``send``)."""

    def __init__(self, device: torch.device, n: int):
        self.n = n
        pinned = device.type == "cuda"  # a copy to or from pageable memory would wait
        self._out = torch.zeros(n, dtype=torch.int32, pin_memory=pinned)
        self._in = torch.zeros(n, dtype=torch.int32, pin_memory=pinned)
        self._device = torch.zeros(n, dtype=torch.int32, device=device)
        self._arrived = torch.cuda.Event() if pinned else None
        self._sent = False

    def send(self, *flags: bool) -> None:
        if len(flags) != self.n:
            raise ValueError(f"LaggedFlags sends {self.n} flags, got {len(flags)}")
        self._wait()  # the last exchange's copies are done: its buffers may be written
        for i, flag in enumerate(flags):
            self._out[i] = int(flag)
        self._device.copy_(self._out, non_blocking=True)
        dist.all_reduce(self._device, op=dist.ReduceOp.MAX)
        self._in.copy_(self._device, non_blocking=True)
        if self._arrived is not None:
            self._arrived.record()
        self._sent = True

    def received(self) -> list[bool]:
        if not self._sent:
            return [False] * self.n
        self._wait()
        return [bool(v) for v in self._in.tolist()]

    def _wait(self) -> None:
        if self._arrived is not None and self._sent:
            self._arrived.synchronize()
