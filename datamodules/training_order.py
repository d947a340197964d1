"""Training order and per-item randomness that are pure functions of (seed, epoch, index).

``EpochSampler`` draws the permutation of an epoch from (seed, epoch) alone and yields
``SampleKey(index, seed)`` items whose ``seed`` = ``item_seed(seed, epoch, index)``; training
datasets draw all their randomness (flip, corruption, pasting) from a ``torch.Generator`` seeded
with it. So a batch does not depend on the global RNG, the worker count or what ran before, and
a run resumed mid-epoch sees exactly the batches an uninterrupted run sees: the sampler skips
the batches of the interrupted epoch that Lightning's restored progress counts as done, read when
the iteration starts (``DeferredLoader`` starts it at the first batch request, after the restore).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

_MASK = (1 << 64) - 1


def _splitmix(x: int) -> int:
    """One step of splitmix64: a well-mixed 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """A 63-bit seed that depends on every value (order matters); equal inputs give equal seeds."""
    h = 0
    for v in values:
        h = _splitmix(h ^ (int(v) & _MASK))
    return h >> 1


def item_seed(seed: int, epoch: int, index: int) -> int:
    return mix(seed, epoch, index)


class SampleKey(NamedTuple):
    """What ``EpochSampler`` yields: the dataset index and the seed of that item's random draws."""

    index: int
    seed: int


def split_keys(keys: Sequence[Any]) -> tuple[list[int], list[torch.Generator] | None]:
    """Indices and one seeded generator per item for ``SampleKey`` items; for plain integer
    indices (direct indexing, Lightning's sequential overfit sampler) ``None``: the caller draws
    from torch's global RNG instead."""
    if all(isinstance(k, SampleKey) for k in keys):
        return [k.index for k in keys], [torch.Generator().manual_seed(k.seed) for k in keys]
    if any(isinstance(k, SampleKey) for k in keys):
        raise TypeError("a batch mixes SampleKey items and plain indices; use one sampler per loader")
    return [int(k) for k in keys], None


class EpochSampler(DistributedSampler):
    """Shuffled training order: permutation of epoch e drawn from ``mix(seed, e)``, split across
    ``num_replicas`` ranks (a ``DistributedSampler``, so Lightning does not replace it under DDP).

    Each iteration starts after the ``done()`` batches (of ``batch_size``) that the training loop
    already counts as done in this epoch: 0 normally, the trained part of the epoch when a run
    resumes mid-epoch. ``len`` stays the full epoch, as Lightning expects when it resumes.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        done: Callable[[], int] | None = None,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.done = done

    def keys(self, epoch: int) -> list[SampleKey]:
        """This rank's items of ``epoch``, in order."""
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(mix(self.seed, epoch)))
        mine = order[: self.total_size][self.rank : self.total_size : self.num_replicas].tolist()
        return [SampleKey(i, item_seed(self.seed, epoch, i)) for i in mine]

    def __iter__(self):
        skip = self.done() * self.batch_size if self.done is not None else 0
        return iter(self.keys(self.epoch)[skip:])


def batches_done(trainer: Any) -> int:
    """Training batches of the current epoch that ``trainer`` counts as done; read when an epoch's
    iteration starts, that is 0 except right after resuming mid-epoch from a checkpoint, when it
    is Lightning's restored count: the same counter that decides where its loop continues."""
    if trainer is None or not getattr(trainer, "training", False):
        return 0
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


class _Deferred:
    """Iterator that creates the loader's real iterator at the first ``next``."""

    def __init__(self, loader: DataLoader):
        self.loader, self.iterator = loader, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.iterator is None:
            self.iterator = DataLoader.__iter__(self.loader)
        return next(self.iterator)


class DeferredLoader(DataLoader):
    """A DataLoader whose iteration (and worker prefetching) starts at the first batch request.
    Lightning creates the train iterator before it restores a checkpoint's loop state (in
    ``estimated_stepping_batches``), so the sampler must not read its position any earlier."""

    def __iter__(self):
        return _Deferred(self)

    def state_dict(self) -> dict:
        """Empty: the position is Lightning's restored loop progress (``batches_done``). Having the
        method tells Lightning that this loader resumes mid-epoch correctly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
