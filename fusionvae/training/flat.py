"""Parameters, gradients and buffers in one contiguous buffer each, so that per-step work over
all of them (the optimiser update, the gradient norm, saving and restoring the state of a skipped
step) is a handful of ops instead of one set of ops per tensor.

Each parameter (buffer) keeps its own shape and strides (channels_last included) but its storage
becomes a view into the flat buffer; autograd accumulates each gradient in place into its slice
of the flat gradient, and DDP copies reduced gradients back in place. The module's state_dict is
unchanged. Moving the module to another device afterwards gives the tensors new storage: call
``flat_parameters`` again (``is_flat`` tells).
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
    their gradients. Give it to the optimiser, and call ``zero_gradients`` before each backward."""
    flat = nn.Parameter(flatten(list(module.parameters())))
    zero_gradients(module, flat)
    return flat


def zero_gradients(module: nn.Module, flat: nn.Parameter) -> None:
    """Zero every gradient with one op; first (re)link them to ``flat.grad`` if anything set them
    to None (e.g. ``zero_grad(set_to_none=True)``)."""
    params = list(module.parameters())
    if flat.grad is None:
        flat.grad = torch.zeros_like(flat)
    elif is_flat(flat.grad, [p.grad for p in params if p.grad is not None]) and all(p.grad is not None for p in params):
        flat.grad.zero_()
        return
    else:
        flat.grad.zero_()
    for p, grad in zip(params, _views(flat.grad, params)):
        p.grad = grad


def flat_buffers(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` moved into one buffer per dtype; returns the buffers (what to save and restore)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    return [flatten(group) for group in by_dtype.values()]
