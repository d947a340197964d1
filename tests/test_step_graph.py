"""``StepGraphs``' bookkeeping on the CPU (warm-up, one capture per key, the batch copied into the
graph's input, outputs cloned, which steps are replays), with the CUDA parts stood in for; the
capture itself is tested on a GPU (tests/test_gpu.py)."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from fusionvae.training.host_waits import HostWaits
from fusionvae.training.optim import OptimSettings, build_optimizer
from fusionvae.training.step_graph import StepGraphs, check_step_graphs


class CpuStepGraphs(StepGraphs):
    """A 'capture' that runs the step once to get its outputs, and a 'replay' that recomputes them
    in place from the static input without running the step's Python (as a CUDA graph would)."""

    def _warm(self, step, batch):
        return step(batch)

    def _capture(self, step, static_batch):
        outputs = step(static_batch)
        return (lambda: outputs["double"].copy_(static_batch * 2)), outputs


class CapturingStepGraphs(StepGraphs):
    """Warm-ups and the capture run the step as they are (no CUDA stream or graph; a replay does
    nothing); counts captures and lists what each capture would wait for (none may)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.captured, self.waits = 0, []

    def _warm(self, step, batch):
        return step(batch)

    def _capture(self, step, static_batch):
        self.captured += 1
        with HostWaits() as waits:
            outputs = step(static_batch)
        self.waits += waits.ops
        return (lambda: None), outputs


def test_warm_up_then_one_capture_per_key_then_replays():
    graphs = CpuStepGraphs(warmup=2)
    runs = []

    def step(batch):
        runs.append(batch.shape)
        return {"double": batch * 2}

    replayed, values = [], []
    for i in range(6):
        batch = torch.full((3,), float(i))
        out, was_replay = graphs.run((1, (3,)), batch, step)
        replayed.append(was_replay)
        values.append(out["double"])
    assert replayed == [False, False, False, True, True, True]  # 2 warm-ups, the capture, replays
    assert len(runs) == 3  # the step's Python ran for the warm-ups and the capture only
    assert [float(v[0]) for v in values] == [0, 2, 4, 6, 8, 10]  # each replay saw its own batch
    assert values[3] is not values[4] and values[3].data_ptr() != values[4].data_ptr()  # cloned
    out, was_replay = graphs.run((2, (3,)), torch.ones(3), step)  # another K: its own warm-up
    assert not was_replay and len(graphs.graphs) == 1 and len(runs) == 4


@pytest.mark.parametrize(
    "device, world, scaler, message",
    [
        ("cpu", 1, None, "needs a CUDA device, but this run is on 'cpu'"),
        ("cuda", 2, None, "runs on one device, but this run has 2 \\(DDP\\)"),
        ("cuda", 1, object(), "does not work with fp16 loss scaling"),
    ],
)
def test_what_cannot_be_captured_is_refused_in_one_line(device, world, scaler, message):
    with pytest.raises(ValueError, match=r"^model\.compile_mode=reduce-overhead \(the training step in CUDA graphs\) "):
        check_step_graphs(device, world, scaler)
    with pytest.raises(ValueError, match=message):
        check_step_graphs(device, world, scaler)
    check_step_graphs("cuda", 1, None)


def test_a_replayed_step_is_counted_without_a_second_update():
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([p], OptimSettings(), total_steps=10, epochs=1)
    p.grad = torch.ones(3)
    closures = []
    opt.step(closure=lambda: closures.append(1), update=False)
    assert closures == [1] and torch.equal(p.detach(), torch.ones(3)) and int(opt.steps_done()) == 0


def test_the_warm_ups_and_the_capture_run_under_one_autocast_without_its_cache():
    """A capture must not use autocast's cast cache; compiled cells guard on that setting, so
    warm-ups under another one would leave them to compile again inside the capture."""
    graphs = CpuStepGraphs(warmup=2, device_type="cpu")
    seen = []

    def step(batch):
        seen.append(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_autocast_cache_enabled())
        )
        return {"double": batch * 2}

    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(4):
            graphs.run((0, (3,)), torch.ones(3), step)
        assert torch.is_autocast_cache_enabled()  # put back after each step
    assert seen == [(True, torch.bfloat16, False)] * 3  # 2 warm-ups and the capture; the replay runs no Python
    seen.clear()
    CpuStepGraphs(warmup=1, device_type="cpu").run((0, (3,)), torch.ones(3), step)  # fp32: nothing changes
    assert [(enabled, cache) for enabled, _, cache in seen] == [(False, True)]


def test_the_capture_compiles_nothing_after_bf16_warm_ups():
    """The module's step with compiled cells (a counting backend, Dynamo's real guards) under bf16
    autocast: the warm-ups compile, the step that would be captured reuses their graphs."""
    from fusionvae.training.compile import compile_network
    from tests.test_compile import counting_backend
    from tests.test_lit_module_mutants import attach, batch, module, with_optimizer

    torch._dynamo.reset()
    compiled = []
    m = module()
    compile_network(m.net, "default", "cpu", k_max=3, backend=counting_backend(compiled))
    attach(m)
    with_optimizer(m)
    m._trainer._logger_connector.should_update_logs = False
    m.draw_k = lambda: 2
    m.step_graphs = graphs = CapturingStepGraphs(warmup=2, device_type="cpu")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for i in range(3):  # the first step (its own key: the power iteration starts), 2 warm-ups
                m.training_step(batch(), i)
            warmed = len(compiled)
            m.training_step(batch(), 3)
    finally:
        torch._dynamo.reset()
    assert warmed > 0 and graphs.captured == 1 and len(compiled) == warmed


def test_the_capture_shares_one_pool_and_lets_other_threads_use_cuda(monkeypatch):
    """``_capture`` with CUDA's graph API stood in for: every capture after the first gets the first
    one's memory pool, and capture errors are thread-local, so the DataLoader's pin-memory thread
    may allocate page-locked memory while a step is captured (the default "global" mode breaks
    the capture then)."""
    captures = []

    class Graph:
        def pool(self):
            return ("pool of", id(self))

        def replay(self):
            pass

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        captures.append((cuda_graph, pool, capture_error_mode))
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    graphs = StepGraphs(warmup=0, device_type="cpu")
    for _ in range(3):
        graphs._capture(lambda b: {"double": b * 2}, torch.ones(2))
    first = captures[0][0]
    assert [(pool, mode) for _, pool, mode in captures] == [
        (None, "thread_local"),
        (first.pool(), "thread_local"),
        (first.pool(), "thread_local"),
    ]


def test_a_capture_reads_nothing_even_when_the_first_steps_were_skipped():
    """Skipped first steps put the power iteration's start flag back, so the next step reads it
    again: on the host side, before a capture, and the graphs are keyed by it (a read inside the
    capture would break it; a graph of the first step replayed later would redo its start)."""
    from tests.test_lit_module_mutants import attach, batch, module, with_optimizer

    m = module()
    attach(m)
    with_optimizer(m)
    m._trainer._logger_connector.should_update_logs = False
    m.draw_k = lambda: 2
    m.step_graphs = graphs = CapturingStepGraphs(warmup=2, device_type="cpu")
    for i, nan in enumerate([True, True, False, False, False, False]):
        m.training_step(batch(nan=nan), i)
    shape = tuple(batch().shape)
    assert graphs.captured == 2 and graphs.waits == []
    assert set(graphs.graphs) == {(2, shape, True), (2, shape, False)}  # steps 0-2, then 3-5


class ReplayedByHand(StepGraphs):
    """After the warm-ups, every step is 'replayed': its update runs without Lightning's Python (the
    step with the bare optimiser), as a CUDA graph's replay does, and ``run`` says so."""

    replays = 0

    def run(self, key, batch, step):
        self.seen[key] += 1
        if self.seen[key] <= self.warmup:
            return step(batch), False
        self.replays += 1
        optimiser = step.keywords["opt"].optimizer
        bare = types.SimpleNamespace(optimizer=optimiser, step=optimiser.step)
        return step.func(batch, **{**step.keywords, "opt": bare}), True


def test_replayed_steps_are_counted_by_lightning_and_train_as_eager_steps(data_dir, tmp_path):
    """The real Trainer with replays stood in for: Lightning counts every replayed step once (its
    global_step, the checkpoint's, the logged rows), and the weights end as an eager run's, bit
    for bit (the same ops on the CPU)."""
    from fusionvae.training.build import build
    from tests.conftest import TINY, compose_cfg

    runs = {}
    for name in ("eager", "replayed"):
        cfg = compose_cfg(
            "train",
            [
                *TINY,
                f"paths.data_dir={data_dir}",
                f"paths.output_dir={tmp_path / name}",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=7",
                "trainer.limit_val_batches=0",
                "trainer.log_every_n_steps=1",
                "callbacks.log_interval=null",
            ],
        )
        datamodule, model, trainer = build(cfg)
        model.draw_k = lambda: 2  # one key after the first step: 2 warm-ups, then replays
        if name == "replayed":
            model.step_graphs = graphs = ReplayedByHand(warmup=2)
        trainer.fit(model, datamodule=datamodule)
        runs[name] = (model, trainer)
    (eager, eager_trainer), (replayed, trainer) = runs["eager"], runs["replayed"]
    assert graphs.replays == 4 and trainer.global_step == eager_trainer.global_step == 7
    assert int(replayed.optimizers().optimizer.steps_done()) == 7
    assert torch.load(tmp_path / "replayed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    assert torch.equal(replayed.step_engine.flat, eager.step_engine.flat)
    logged = (tmp_path / "replayed" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert len([row for row in logged[1:] if row.split(",")[0]]) == 7  # a row of train/ metrics per step
