"""glibc allocator settings for evaluation on the CPU.

Evaluation allocates and frees the same large activation blocks (a batch times ``eval.iw_chunk``
images) over and over. By default glibc serves blocks above 128 KiB with mmap and returns freed
memory to the system, so every pass pays page faults again: half of evaluation's CPU time was
system time. Keeping freed memory in the process made evaluation 1.8x faster on a 2-core CPU, at
the cost of a higher peak RSS (1.7 -> 2.4-3.0 GB for 32 items x 20 samples; README, "Performance").
Training gains only ~3 %, so only evaluation sets it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
SETTINGS = {M_MMAP_THRESHOLD: 1 << 30, M_TRIM_THRESHOLD: (1 << 31) - 1}


def keep_freed_memory() -> bool:
    """Apply ``SETTINGS`` with glibc's ``mallopt``; False (and nothing changed) without glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):  # musl, macOS, Windows: no mallopt
        return False
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
