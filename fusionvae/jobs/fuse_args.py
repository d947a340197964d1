"""Checks of ``fusionvae.jobs.fuse``'s arguments, made before anything is loaded: each raises
``BadInputError`` naming the value and the fix; ``ArgumentParser`` reports a bad command line as the
one line ``error: <what is wrong>`` (exit status 2)."""

from __future__ import annotations

import argparse
import math
import re

import torch

from fusionvae.errors import BadInputError

DEVICES = "cpu, cuda, cuda:<index> or mps"
MAX_SEED = 2**64 - 1  # torch.manual_seed's range


def check_device(spec: str | torch.device) -> torch.device:
    """``spec`` as a torch device this machine has; ``BadInputError`` naming it and the fix (cheap:
    no CUDA context is made, nothing is loaded)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise BadInputError(f"--device {str(spec)!r} is not a torch device: use {DEVICES}") from None
    index = device.index or 0
    if device.type == "cpu":
        return device
    if device.type == "mps":
        if not (torch.backends.mps.is_available() and index == 0):
            where = "no MPS (Apple GPU) device is available here" if index == 0 else "mps has one device, mps:0"
            raise BadInputError(f"--device {device}: {where}; use --device cpu")
        return device
    backend = getattr(torch, device.type, None)
    if device.type == "meta" or not callable(getattr(backend, "is_available", None)):
        raise BadInputError(f"--device {device}: the model cannot run on device type {device.type!r}; use {DEVICES}")
    if not backend.is_available():
        why = " (this PyTorch is built without CUDA)" if device.type == "cuda" and not torch.version.cuda else ""
        kind = "CUDA" if device.type == "cuda" else device.type.upper()
        raise BadInputError(f"--device {device}: no {kind} device is available here{why}; use --device cpu")
    count = backend.device_count()
    if index >= count:
        have = f"{device.type}:0" if count == 1 else f"{device.type}:0..{device.type}:{count - 1}"
        raise BadInputError(
            f"--device {device}: this machine has {count} {device.type} device{'s' * (count != 1)} ({have}); "
            f"use one of them or --device cpu"
        )
    return device


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float: finite and >= 0 (0: z = the prior means), else ``BadInputError``."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        t = math.nan
    if not (math.isfinite(t) and t >= 0):
        raise BadInputError(
            f"--temperature must be a finite number >= 0 (1: the prior, 0: its means), got {temperature!r}"
        )
    return t


def whole(text: str, name: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f">= {low}" + ("" if high is None else f" and below 2**{high.bit_length()}")
        raise BadInputError(f"{name} must be a whole number {bound}, got {text!r}")
    return value


def arg_type(check, *args):
    """An argparse ``type`` from a check that raises ``BadInputError``."""

    def convert(text: str):
        try:
            return check(text, *args)
        except BadInputError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors as the one line ``error: <what is wrong>`` (exit status 2), as every entry point."""

    def error(self, message: str):
        checked = re.sub(r"^argument (\S+): (?=\1 )", "", message)  # our checks name the option and the fix
        help_hint = "" if checked != message else f" ({self.prog} --help lists the options)"
        self.exit(2, f"error: {checked}{help_hint}\n")
