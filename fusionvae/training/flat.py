"""Parameters, gradients and buffers in one contiguous buffer each, so that per-step work over
all of them (the optimiser update, the gradient norm, saving and restoring the state of a skipped
step) is a handful of ops instead of one set of ops per tensor.

Each parameter (buffer) keeps its own shape and strides (channels_last included) but its storage
becomes a view into the flat buffer. Gradients are written by autograd into tensors of their own
and gathered into the flat gradient with one ``cat`` (``FlatGradients``): accumulating them in
place into a zeroed flat gradient costs an add per parameter (432 kernels per step for the paper
model). The module's state_dict is unchanged. Moving the module to another device afterwards
gives the tensors new storage: call ``flat_parameters`` again (``is_flat`` tells).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _views(flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for t in tensors:
        out.append(torch.as_strided(flat, t.shape, t.stride(), offset))
        offset += t.numel()
    return out


@torch.no_grad()
def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Move ``tensors`` (one dtype and device, dense; parameters or buffers, whose ``.data`` is
    replaced) into one new buffer and return it."""
    if not tensors or not all(_dense(t) for t in tensors):
        raise ValueError("flatten needs a non-empty list of dense tensors")
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    for t, view in zip(tensors, _views(flat, tensors)):
        view.copy_(t)
        t.data = view
    return flat


def is_flat(flat: torch.Tensor | None, tensors: list[torch.Tensor]) -> bool:
    """Whether ``tensors`` still live in ``flat`` (a device move gives them new storage)."""
    return flat is not None and all(
        t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for t in tensors
    )


def flat_parameters(module: nn.Module) -> nn.Parameter:
    """One ``nn.Parameter`` whose data backs every parameter of ``module`` and whose ``.grad`` backs
    their gradients (each ``p.grad`` a view of its slice). Give it to the optimiser; around each
    backward use ``FlatGradients``."""
    params = list(module.parameters())
    flat = nn.Parameter(flatten(params))
    flat.grad = torch.zeros_like(flat)
    for p, grad in zip(params, _views(flat.grad, params)):
        p.grad = grad
    return flat


def memory_order(t: torch.Tensor) -> list[int]:
    """The permutation of ``t``'s dims that is contiguous (``t.permute(order)``): its elements in
    the order they lie in memory, as ``flatten`` stored them."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


class FlatGradients:
    """``release`` before a backward pass sets every ``p.grad`` to None, so autograd stores each
    gradient it computes instead of adding it into a buffer; ``gather`` after it writes them all into
    ``flat.grad`` with one ``cat`` (zeros for parameters that got none) and points each ``p.grad``
    at its slice again, so the optimiser, the gradient norm and clipping read one buffer."""

    def __init__(self, module: nn.Module, flat: nn.Parameter):
        self.params = list(module.parameters())
        if not is_flat(flat, self.params):
            raise ValueError("FlatGradients needs the parameters that flat_parameters(module) flattened")
        self.flat = flat
        self.views = _views(flat.grad, self.params)
        self.orders = [memory_order(p) for p in self.params]
        self.zeros = torch.zeros(max(p.numel() for p in self.params), dtype=flat.dtype, device=flat.device)

    def release(self) -> None:
        for p in self.params:
            p.grad = None

    def gather(self) -> torch.Tensor:
        """Write this backward's gradients into ``flat.grad`` (returned)."""
        parts = [
            self.zeros[: p.numel()] if p.grad is None else p.grad.permute(order).reshape(-1)
            for p, order in zip(self.params, self.orders)
        ]
        torch.cat(parts, out=self.flat.grad)
        for p, view in zip(self.params, self.views):
            p.grad = view
        return self.flat.grad


def flat_buffers(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` moved into one buffer per dtype; returns the buffers (what to save and restore)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    return [flatten(group) for group in by_dtype.values()]
