"""fusionvae.jobs.malloc: glibc's mallopt is found and accepts the evaluation settings."""

from __future__ import annotations

import platform

import pytest

from fusionvae.jobs import malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_applies_every_setting():
    assert malloc.keep_freed_memory() is True
    assert set(malloc.SETTINGS) == {malloc.M_MMAP_THRESHOLD, malloc.M_TRIM_THRESHOLD}


def test_without_mallopt_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(malloc.ctypes.util, "find_library", lambda name: None)
    assert malloc.keep_freed_memory() is False
