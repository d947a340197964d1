"""Which ATen ops make the host wait for the device, found on any device, the CPU included.

On a GPU each of these stalls Python until the GPU has caught up, and any one of them inside a
training step makes a CUDA-graph capture of that step fail (``fusionvae.training.step_graph``).
On the CPU nothing waits, so a profile of a CPU step cannot show them by timing; ``HostWaits``
finds them by what the op is:

- a device value read into Python: ``.item()``, ``bool()``, ``int()`` of a tensor
  (``aten::_local_scalar_dense``), ``torch.equal``, ``allclose`` (ATen's ``data_dependent_output``);
- an output whose shape depends on the values, which CUDA must copy back to size it: ``nonzero``,
  ``masked_select``, ``unique``, indexing with a boolean mask (``x[mask]``, ``x[mask] = v``),
  ``repeat_interleave`` without ``output_size`` (ATen's ``dynamic_output_shape``);
- a copy from the device to the host (``.cpu()``, ``.tolist()``: only visible off the CPU).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_MASKED_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def waits_for_device(func, args: tuple, kwargs: dict) -> bool:
    """Whether ``func(*args, **kwargs)`` makes the host wait for the device its tensors are on."""
    packet = func.overloadpacket
    if torch.Tag.data_dependent_output in func.tags:
        return True
    if packet in _MASKED_INDEXING:  # an integer index keeps the shape static; a mask does not
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if packet is aten.repeat_interleave:
        return kwargs.get("output_size") is None
    if torch.Tag.dynamic_output_shape in func.tags:
        return True
    return packet in (aten._to_copy, aten.copy_) and _to_host(args, kwargs)


def _to_host(args: tuple, kwargs: dict) -> bool:
    """A copy from a device to the host that the host waits for: all but ``copy_(pinned, src,
    non_blocking=True)``, which returns at once (its reader waits for it later, on an event)."""
    if len(args) > 1:  # copy_(dst, src, non_blocking=False)
        dst, source = args[0], args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        if non_blocking and dst.device.type == "cpu" and dst.is_pinned():
            return False
        target = dst.device
    else:  # _to_copy(src, device=...)
        source, target = args[0], kwargs.get("device")
    return source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"


class HostWaits(TorchDispatchMode):
    """``with HostWaits() as waits: ...``: ``waits.ops`` lists, in call order, the name of every op
    run inside that makes the host wait for the device (``waits_for_device``)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if waits_for_device(func, args, kwargs):
            self.ops.append(str(func.overloadpacket))
        return func(*args, **kwargs)
