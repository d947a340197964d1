"""``model.compile_mode=reduce-overhead``: the whole training step (forward, backward, gradient
gather, the skip decision, the optimiser update and the buffers' restore) replayed from a CUDA
graph, one graph per (K, batch shape, first power-iteration step or not).

A step can be captured because it reads nothing back from the device (``fusionvae.training.step``):
its Python path depends only on K, the batch shape and whether the spectral power iteration
starts (a flag read on the host side, in the first steps only), which key the graphs. What must
happen on the host every step stays outside: K's draw, the seeds, the host copies of counters,
logging, and Lightning's count of optimiser steps (``run`` says when the step was a replay, whose
Python did not run: the module then lets Lightning count it without a second update).

Each key's first ``warmup`` steps run eagerly on a side stream (cuDNN and the autograd engine
settle there, as CUDA graphs need); the next one is captured and replayed, and every later step
of that key is a replay: a copy of the batch into the graph's input and one launch. Graphs share
one memory pool; their outputs are cloned right after a replay, so none is alive when another
graph runs. The random draws follow the CUDA generator's seed at replay time, so the per-step
``torch.manual_seed`` keeps a step's noise what eager training draws.

CUDA only, one device, no fp16 GradScaler (its step reads the device): ``check_step_graphs``
refuses the rest in one line.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable

import torch

Step = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def check_step_graphs(device_type: str, world_size: int, scaler: object | None) -> None:
    if device_type != "cuda":
        problem = f"needs a CUDA device, but this run is on '{device_type}'"
    elif world_size > 1:
        problem = f"runs on one device, but this run has {world_size} (DDP)"
    elif scaler is not None:
        problem = "does not work with fp16 loss scaling (trainer.precision=16-mixed): use bf16-mixed or 32-true"
    else:
        return
    raise ValueError(
        f"model.compile_mode=reduce-overhead (the training step in CUDA graphs) {problem}; "
        "or use model.compile_mode=default"
    )


class StepGraphs:
    def __init__(self, warmup: int = 3, device_type: str = "cuda"):
        self.warmup, self.device_type = warmup, device_type
        self.seen: Counter = Counter()
        self.graphs: dict[tuple, tuple[torch.Tensor, Callable[[], None], dict[str, torch.Tensor]]] = {}
        self.pool = None

    def run(self, key: tuple, batch: torch.Tensor, step: Step) -> tuple[dict[str, torch.Tensor], bool]:
        """``step(batch)``'s outputs, and whether this was a replay (``step``'s Python did not run)."""
        entry = self.graphs.get(key)
        if entry is not None:
            static_batch, replay, outputs = entry
            static_batch.copy_(batch)
            replay()
            return {name: t.clone() for name, t in outputs.items()}, True
        self.seen[key] += 1
        with _autocast_without_cache(self.device_type):  # the same for the warm-ups and the capture
            if self.seen[key] <= self.warmup:
                return self._warm(step, batch), False
            static_batch = batch.clone()
            replay, outputs = self._capture(step, static_batch)
        self.graphs[key] = (static_batch, replay, outputs)
        replay()  # a capture records the step's kernels without running them
        return {name: t.clone() for name, t in outputs.items()}, False

    def _warm(self, step: Step, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = step(batch)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def _capture(self, step: Step, static_batch: torch.Tensor) -> tuple[Callable[[], None], dict[str, torch.Tensor]]:
        graph = torch.cuda.CUDAGraph()
        # thread_local: under the default "global" mode a CUDA call from any other thread (the
        # DataLoader's pin-memory thread allocating page-locked memory for the next batch) breaks
        # the capture and poisons that thread; its calls touch none of the captured streams
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = step(static_batch)
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay, outputs


def _autocast_without_cache(device_type: str):
    """The surrounding autocast (Lightning's bf16) without its cast cache. A captured region must
    not use the cache: cached casts would be the capture's, not the replay's. The warm-ups run
    under it too, because compiled cells guard on the cache setting (Dynamo's global state): warmed
    up with it on, they would compile again inside the capture."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)
