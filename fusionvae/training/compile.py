"""``model.compile=true``: torch.compile of the network's loss path, in place.

``compile_network(net, mode, device_type)`` replaces ``net.forward`` by a forward that sends the
calls with a target (the training and validation loss: one posterior draw per item) through
``torch.compile`` and everything else (sampling from the prior for grids, evaluation and ``fuse``:
a graph per K, temperature and repeat count would be compiled for a few calls each) through the
eager forward. The parameters, buffers and ``state_dict`` keys are unchanged (checkpoints load
either way) and a second call is a no-op.

``mode``: ``default`` (inductor kernels) or ``reduce-overhead`` (inductor + CUDA graphs, CUDA
only: on the CPU it is refused with a ``ValueError`` naming ``model.compile_mode``). The backend is
inductor; the environment variable ``FUSIONVAE_COMPILE_BACKEND`` picks another (``aot_eager``: the
same graphs without code generation, for debugging and the CPU tests, where inductor needs minutes).
Activation checkpointing (``model.activation_checkpointing``) is refused: Dynamo cannot trace its
BatchNorm-freezing context; the compiled graph's partitioner recomputes cheap ops by itself.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn

COMPILE_MODES = ("default", "reduce-overhead")
# One graph per K (the number of views is an input shape) and per mode (train / eval, a module
# attribute Dynamo guards on) and batch shape: the training batch, the validation batch, and the
# last, smaller batch of each epoch. dynamic=False keeps these as separate static graphs (no
# symbolic shapes, best kernels), so K = 0..k_max needs 2 modes x 2 batch shapes x (k_max + 1)
# entries; Dynamo's default limit (8) would fall back to eager after the first 8.
GRAPHS_PER_K = 4


def check_compile_mode(mode: str, device_type: str) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"model.compile_mode must be one of {', '.join(COMPILE_MODES)}, got '{mode}'")
    if mode == "reduce-overhead" and device_type != "cuda":
        raise ValueError(
            f"model.compile_mode=reduce-overhead needs CUDA graphs (a CUDA device), but this run is "
            f"on '{device_type}': use model.compile_mode=default"
        )


def raise_recompile_limit(k_max: int) -> int:
    """Let Dynamo keep ``GRAPHS_PER_K * (k_max + 1)`` graphs of one function; returns the limit."""
    config = torch._dynamo.config
    limit = max(config.cache_size_limit, GRAPHS_PER_K * (k_max + 1))
    config.cache_size_limit = limit  # torch >= 2.7 also calls it recompile_limit (an alias)
    config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, 2 * limit)
    return limit


def is_compiled(net: nn.Module) -> bool:
    return getattr(net, "_fusionvae_compiled", None) is not None


def compile_network(
    net: nn.Module, mode: str = "default", device_type: str = "cpu", k_max: int = 3, backend: str | None = None
) -> nn.Module:
    """Compile ``net``'s loss path in place (see the module docstring) and return ``net``."""
    check_compile_mode(mode, device_type)
    if is_compiled(net):
        return net
    if getattr(net, "activation_checkpointing", False):
        raise ValueError(
            "model.compile=true does not work with model.activation_checkpointing=true (Dynamo cannot "
            "trace its BatchNorm-freezing checkpoint): set one of them to false"
        )
    backend = backend or os.environ.get("FUSIONVAE_COMPILE_BACKEND", "inductor")
    raise_recompile_limit(k_max)
    eager = net.forward
    inductor_mode = mode if backend == "inductor" and mode != "default" else None
    compiled = torch.compile(eager, mode=inductor_mode, dynamic=False, backend=backend)
    cuda_graphs = inductor_mode == "reduce-overhead"

    @functools.wraps(eager)
    def forward(views, target=None, t: float = 1.0, repeats: int = 1):
        if target is None or repeats != 1:
            return eager(views, target, t, repeats)
        if cuda_graphs:
            # each call is one step: the outputs of the previous one (consumed by then) may be reused
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(views, target, t, repeats)

    net.forward = forward  # an instance attribute: parameters, buffers and state_dict keys unchanged
    net._fusionvae_compiled = (mode, backend)
    return net
