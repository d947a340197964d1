"""Errors in the user's data (not in the code), reported by the entry points as one line.

``fusionvae.jobs.reporting.reported`` turns a ``DataError`` into ``error: <message>`` on stderr and exit
status 1 (``HYDRA_FULL_ERROR=1`` shows the traceback); it is a ``ValueError`` for callers."""

from __future__ import annotations


class DataError(ValueError):
    """The data cannot be used as it is (an empty or changed folder, unreadable images, too few
    images for the split); the message says what to fix."""
