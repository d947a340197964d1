"""A Python copy of a scalar buffer that is read from the device only when the buffer changed.

Counters and flags that must live in buffers (checkpoints, exact resume, a skipped step's
restore) are needed in Python every step (seeds, loop counts). Reading one (``int(t)``, ``bool(t)``)
is a host sync that stalls a GPU. A tensor's ``_version`` counts its in-place changes (a state-dict
load included) and its ``data_ptr`` changes with a device move or a new tensor: while both are what
the copy saw, the copy is still right. A write that bypasses the tensor object is not seen: the
step engine puts buffers back through the flat buffer behind them after every step
(``fusionvae.training.step``, a no-op unless the step is skipped). So a value a step changes must
not be ``set`` but ``forget``-ed: it is read again at the next ``get``, after the step has been
kept or undone."""

from __future__ import annotations

import torch


class HostCopy:
    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._value = None

    @staticmethod
    def _key_of(t: torch.Tensor) -> tuple[int, int]:
        return t.data_ptr(), t._version

    def get(self, t: torch.Tensor):
        """``t.item()``, read from the device only if ``t`` changed since the last ``get`` / ``set``."""
        key = self._key_of(t)
        if key != self._key:
            self._key, self._value = key, t.item()
        return self._value

    def forget(self) -> None:
        """Read the device again at the next ``get``."""
        self._key = None

    def set(self, t: torch.Tensor, value) -> None:
        """Record that ``t`` now holds ``value`` (after an in-place change this code made)."""
        self._key, self._value = self._key_of(t), value
