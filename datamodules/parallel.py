"""Parallel generation helper for the LMDB builders: ``fn`` over items on worker processes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """CPU cores available to this process."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core already


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int | None = None,
    desc: str = "",
    chunksize: int = 16,
    progress: bool = True,
) -> Iterator[R]:
    """``fn`` over ``items`` in order, on ``workers`` processes (None: all cores, 0/1: in-process),
    with a rich progress bar. ``fn`` must be picklable (module-level function or partial)."""
    from multiprocessing import get_context

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    n = min(default_workers() if workers is None else workers, len(items))
    pool = get_context().Pool(n, initializer=_init_worker) if n > 1 else None  # before the bar's thread starts
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task(desc, total=len(items))
            results = pool.imap(fn, items, chunksize) if pool is not None else map(fn, items)
            for result in results:
                bar.advance(task)
                yield result
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
