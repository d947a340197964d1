"""Checks that need a CUDA GPU (``pytest -m gpu``; skipped without one; benchmarks/device_check.sh
runs them): the default config picks the GPU and bf16, bf16 mixed precision keeps the
distribution maths in fp32, ``model.compile=true`` (inductor, default and reduce-overhead) gives
the eager values, a training step never waits for the GPU, and SyncBatchNorm under the DDP
trainer (2 GPUs or more)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch._inductor.config  # noqa: F401 (monkeypatched below)
from lightning.pytorch.accelerators import CUDAAccelerator
from torch._dynamo.utils import counters

from fusionvae.training.build import build
from fusionvae.training.compile import is_compiled
from tests.conftest import TINY, compose_cfg
from tests.test_train import SHORT, run_cli

CUDA = torch.cuda.is_available()
BF16 = CUDA and torch.cuda.is_bf16_supported(including_emulation=False)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]


def cfg(data_dir, out, *overrides):
    return compose_cfg(
        "train", [*TINY, "debug=fdr", f"paths.data_dir={data_dir}", f"paths.output_dir={out}", *overrides]
    )


def fit(config):
    datamodule, model, trainer = build(config)
    trainer.fit(model, datamodule=datamodule)
    return model, trainer, {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.parametrize("overrides", [["debug=fdr"], []], ids=["debug=fdr", "defaults"])
def test_train_py_picks_the_gpu_and_bf16(tmp_path, overrides):
    """What ``python train.py debug=fdr`` builds (no data is read): the GPU, bf16 where it exists."""
    config = compose_cfg(
        "train", [*overrides, "logger=csv", f"paths.data_dir={tmp_path}", f"paths.output_dir={tmp_path}"]
    )
    _, _, trainer = build(config)
    assert isinstance(trainer.accelerator, CUDAAccelerator) and trainer.strategy.root_device.type == "cuda"
    assert trainer.precision == ("bf16-mixed" if BF16 else "32-true")


@pytest.mark.skipif(not BF16, reason="needs a GPU with native bf16")
def test_bf16_fast_dev_run_keeps_the_distribution_maths_fp32(data_dir, tmp_path):
    datamodule, model, trainer = build(cfg(data_dir, tmp_path))
    assert trainer.precision == "bf16-mixed"
    seen, convs = [], []
    terms = model.terms

    def recording_terms(batch, k):
        out = terms(batch, k)
        seen.append((k, out.nll.dtype, out.kl.dtype, torch.is_autocast_enabled("cuda")))
        return out

    model.terms = recording_terms
    model.net.image_head.register_forward_hook(
        lambda m, i, out: convs.append((out.dtype, torch.is_autocast_enabled("cuda")))
    )
    trainer.fit(model, datamodule=datamodule)
    metrics = trainer.callback_metrics
    assert len(seen) == 1 + 4  # one training batch, validation K = 0..3
    assert all(nll == kl == torch.float32 and autocast for _, nll, kl, autocast in seen), seen
    assert {dtype for dtype, autocast in convs if autocast} == {torch.bfloat16}  # the network ran in bf16
    assert {dtype for dtype, autocast in convs if not autocast} <= {torch.float32}  # sampling for the grids: fp32
    assert all(torch.isfinite(metrics[key]) for key in ["train/loss", "train/reg", "val/nelbo"])
    assert model.device.type == "cuda" and int(model.skipped_steps) == 0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_sync_batchnorm_under_the_ddp_trainer(data_dir, tmp_path):
    out = tmp_path / "ddp"
    run_cli(
        [
            *TINY,
            "trainer=ddp",
            "trainer.devices=2",
            *SHORT,
            "dataset.batch_size=4",
            f"paths.data_dir={data_dir}",
            f"hydra.run.dir={out}",
            "+callbacks.sync_probe._target_=tests.gpu_helpers.SyncBatchNormProbe",
        ],
        tmp_path,
    )
    for rank in range(2):
        info = json.loads((out / f"sync_batchnorm_rank{rank}.json").read_text())
        assert info["sync"] > 0 and info["plain"] == 0 and info["world_size"] == 2, info
        assert info["device"] == f"cuda:{rank}"
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@contextlib.contextmanager
def never_waiting():
    """CUDA's sync debug mode at "error": any operation that makes the host wait for the GPU (a
    value read into Python, a blocking copy from the host) raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_training_step_on_the_gpu_never_waits_for_it():
    """CUDA's sync debug mode raises on every operation that makes the host wait for the GPU (a
    value read into Python, a blocking copy from the host): a training step has none, a skipped
    one included. The CPU twin, tests/test_lit_module_mutants.py, counts the reads only."""
    from tests.test_lit_module_mutants import attach, batch, module, with_optimizer

    m = module().cuda()
    attach(m)
    with_optimizer(m)
    m._trainer._logger_connector.should_update_logs = False  # logging steps read the skip count
    good, bad = batch().cuda(), batch(nan=True).cuda()
    m.training_step(good, 0)  # the first steps read the power-iteration flag and the batch counter
    m.training_step(good, 1)
    with never_waiting():
        m.training_step(good, 2)
        m.training_step(bad, 3)
    assert int(m.skipped_steps) == 1 and m.step_engine.consecutive_skips == 1


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_training_step_replayed_from_a_cuda_graph_matches_eager(checkpointing):
    """model.compile_mode=reduce-overhead's step graphs (fusionvae.training.step_graph) against the
    eager step, from the same weights on the same batches: the first step (a key of its own: the
    power iteration starts), two warm-up steps, the capture, then replays, one of them with a NaN
    batch (skipped inside the graph). The replays wait for nothing.
    With activation checkpointing too: its recompute runs inside the captured backward."""
    from fusionvae.training.step_graph import StepGraphs
    from tests.test_lit_module_mutants import attach, batch, module, with_optimizer

    runs = []
    for graphed in (False, True):
        m = module(activation_checkpointing=checkpointing).cuda()
        attach(m)
        with_optimizer(m)
        m._trainer._logger_connector.should_update_logs = False
        m.draw_k = lambda: 2  # one key: every step after the warm-up is the graph's
        if graphed:
            m.step_graphs = StepGraphs(warmup=2)
        losses = []
        batches = [b.cuda() for b in (batch(), batch(), batch(), batch(), batch(nan=True), batch())]
        for i, b in enumerate(batches):  # (a copy from pageable host memory would wait: made before)
            with never_waiting() if graphed and i >= 4 else contextlib.nullcontext():
                m.training_step(b, i)
            losses.append(m.log_dict.calls[-1][0][0]["train/loss"])
        runs.append((m, torch.stack(losses).cpu()))
    (eager, eager_losses), (graph, graph_losses) = runs
    assert len(graph.step_graphs.graphs) == 1 and int(graph.skipped_steps) == int(eager.skipped_steps) == 1
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(graph.step_engine.flat, eager.step_engine.flat, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.named_buffers(), graph.buffers()):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-5, msg=name)
    assert int(graph.optimizers().optimizer.steps_done()) == int(eager.optimizers().optimizer.steps_done()) == 5


def test_lagged_flags_on_the_gpu(tmp_path):
    """RunGuard's agreement under DDP (fusionvae.training.rank_flags.LaggedFlags) through NCCL, one
    rank: page-locked host buffers, and the answer one exchange late."""
    import torch.distributed as dist

    from fusionvae.training.rank_flags import LaggedFlags

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        flags = LaggedFlags(torch.device("cuda"), 2)
        assert flags._out.is_pinned() and flags._in.is_pinned()
        seen = [flags.received()]
        flags.send(True, False)
        seen.append(flags.received())
        flags.send(False, True)
        seen.append(flags.received())
    finally:
        dist.destroy_process_group()
    assert seen == [[False, False], [True, False], [False, True]]


# ---- last: inductor compiles for minutes, and a stage time limit should cut these, not the rest
# k_max=1: training + validation K = 0, 1 are 18 cell graphs to compile per mode (inductor takes a while)
COMPILED = ["trainer.precision=32-true", "dataset.k_max=1"]


@pytest.fixture(scope="module")
def eager_fp32(data_dir, tmp_path_factory):
    return fit(cfg(data_dir, tmp_path_factory.mktemp("eager"), *COMPILED))[2]


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_on_cuda_matches_eager(data_dir, tmp_path, monkeypatch, eager_fp32, mode):
    """Inductor (and CUDA graphs) on one training + one validation batch, fp32 so that the values
    can be compared; ``fallback_random`` makes inductor draw the eager posterior noise."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    graphs = counters["stats"]["unique_graphs"]
    model, trainer, metrics = fit(
        cfg(data_dir, tmp_path, *COMPILED, "model.compile=true", f"model.compile_mode={mode}")
    )
    assert is_compiled(model.net) and model.net._fusionvae_compiled == (mode, "inductor")
    # training: the tiny model's 7 cell kinds at one K; validation: 7 at K = 0, the 4 encoder cells at K = 1
    assert counters["stats"]["unique_graphs"] - graphs == 7 + 7 + 4
    for key in ["train/loss", "train/nelbo", "val/nelbo_k0", "val/nelbo_k1"]:
        assert metrics[key] == pytest.approx(eager_fp32[key], rel=2e-3), key
    torch._dynamo.reset()
