"""``model.compile=true``: regional torch.compile of the network, in place.

``compile_network(net, mode, device_type, k_max)`` compiles each residual cell of ``net``
(``fusionvae.model.cells.Cell``, where most of the step's ops are) with ``nn.Module.compile``.
Dynamo keeps the compiled code on ``Cell.forward`` and lifts a cell's parameters, buffers and
this step's normalised weights (``WNConv2d.given_weight``) as graph inputs, so all cells of one
kind and shape share one graph: the paper MNIST model's 19 cells need 10 graphs for one K, not a
graph of the whole network (which took 34.5 min of inductor on a 2-core CPU before the first step).

The network's own forward stays eager: the loop over latent groups, the latent draws, and the
weight normalisation of all convs at once (``normalise_together``), whose stacks the spectral
regulariser reuses, compiled or not. Calls without a target or with ``repeats`` (sampling for
grids, evaluation, ``fuse``: a batch shape per repeat count, a few calls each) run all cells
eagerly. The parameters, buffers and ``state_dict`` keys are unchanged (checkpoints load either
way) and a second call is a no-op. With ``model.activation_checkpointing`` the recompute in
backward calls the compiled cells again (BatchNorm momentum 0 there: a second graph per kind).

``mode``: ``default`` (inductor kernels) or ``reduce-overhead``: the same cells, and the whole
training step in a CUDA graph per K (``fusionvae.training.step_graph``; the module sets it up),
CUDA only: on the CPU it is refused with a ``ValueError`` naming ``model.compile_mode``. The
cells get no CUDA graphs of their own: they are inside the step's. The backend is
inductor; the environment variable ``FUSIONVAE_COMPILE_BACKEND`` picks another (``aot_eager``: the
same graphs without code generation, for debugging and the CPU tests, where inductor needs minutes).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn

from fusionvae.model.cells import Cell

COMPILE_MODES = ("default", "reduce-overhead")
# Static shapes (dynamic=False: the best kernels) give a cell kind one graph per input shape and
# mode: the encoder's batch is B x (K + 1) slots, so one per K, times train / eval (a module
# attribute Dynamo guards on), times the training and validation batch sizes, times 2 with
# activation checkpointing (its recompute runs BatchNorm with momentum 0, a constant of the graph).
GRAPHS_PER_K = 8


def check_compile_mode(mode: str, device_type: str) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"model.compile_mode must be one of {', '.join(COMPILE_MODES)}, got '{mode}'")
    if mode == "reduce-overhead" and device_type != "cuda":
        raise ValueError(
            f"model.compile_mode=reduce-overhead needs CUDA graphs (a CUDA device), but this run is "
            f"on '{device_type}': use model.compile_mode=default"
        )


def raise_recompile_limit(regions: int, k_max: int) -> int:
    """Let Dynamo keep ``GRAPHS_PER_K * (k_max + 1)`` graphs per compiled region (all regions share
    ``Cell.forward``'s cache); returns the limit. Past it, Dynamo would run the cells eagerly."""
    config = torch._dynamo.config
    limit = max(config.cache_size_limit, regions * GRAPHS_PER_K * (k_max + 1))
    config.cache_size_limit = limit  # torch >= 2.7 also calls it recompile_limit (an alias)
    config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, limit)
    return limit


def inductor_options(channels_last: bool) -> dict:
    """Inductor's settings: for a channels_last network, channels_last layouts also in the backward
    graphs. Inductor picks them only for graphs with a forward conv; otherwise it lays out a conv
    backward's input in the weight gradient's stride order, which is ambiguous for a depthwise
    weight [out, 1, k, k]: it chose [N, H, C, W], and the paper model's last post-processing cell
    took 74 ms for forward and backward compiled, 63-71 ms eager on this CPU (51 ms compiled with
    this setting)."""
    return {"force_layout_optimization": channels_last}


def compiled_regions(net: nn.Module) -> list[nn.Module]:
    """The modules ``compile_network`` compiles: every residual cell."""
    return [m for m in net.modules() if isinstance(m, Cell)]


def is_compiled(net: nn.Module) -> bool:
    return getattr(net, "_fusionvae_compiled", None) is not None


def compile_network(
    net: nn.Module, mode: str = "default", device_type: str = "cpu", k_max: int = 3, backend: str | None = None
) -> nn.Module:
    """Compile ``net``'s cells in place (see the module docstring) and return ``net``."""
    check_compile_mode(mode, device_type)
    if is_compiled(net):
        return net
    backend = backend or os.environ.get("FUSIONVAE_COMPILE_BACKEND", "inductor")
    settings = {}
    if backend == "inductor":
        settings["options"] = inductor_options(net.memory_format == torch.channels_last)
    regions = compiled_regions(net)
    raise_recompile_limit(len(regions), k_max)
    for region in regions:  # in place: parameters, buffers and state_dict keys unchanged
        region.compile(dynamic=False, backend=backend, **settings)
    eager = net.forward

    @functools.wraps(eager)
    def forward(views, target=None, t: float = 1.0, repeats: int = 1):
        if target is None or repeats != 1:
            with torch.compiler.set_stance("force_eager"):
                return eager(views, target, t, repeats)
        return eager(views, target, t, repeats)

    net.forward = forward  # an instance attribute, as the cells' compiled calls
    net._fusionvae_compiled = (mode, backend)
    return net
