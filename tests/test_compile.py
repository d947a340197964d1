"""``model.compile=true``: the network's cells are compiled one kind at a time and share graphs
across instances; compiled training gives the eager values; sampling stays eager; unsupported
settings are refused in one line.

Inductor needs minutes per graph on a 2-core CPU, so these tests use the ``aot_eager`` backend
(the same Dynamo / AOTAutograd graphs, run by eager kernels), through ``FUSIONVAE_COMPILE_BACKEND``
or a counting backend; tests/test_gpu.py compiles with inductor.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fusionvae.model.layers import WNConv2d
from fusionvae.model.regularizers import SpectralPenalty
from fusionvae.training.build import build
from fusionvae.training.compile import compile_network, compiled_regions, inductor_options, is_compiled
from tests.conftest import TINY, compose_cfg
from tests.test_network import data, tiny


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def counting_backend(graphs: list):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def cell_kinds(views: torch.Tensor, target: torch.Tensor) -> set:
    """What a cell's graph depends on, for every cell the eager tiny network runs on ``views``:
    its input shape and its parameters' names and shapes (which also tell its layers apart)."""
    kinds = set()

    def record(cell, args):
        kinds.add((tuple(args[0].shape), tuple((n, tuple(p.shape)) for n, p in cell.named_parameters())))

    net = tiny()
    for cell in compiled_regions(net):
        cell.register_forward_pre_hook(record)
    net(views, target)
    return kinds


def test_cells_of_one_kind_share_a_graph():
    """9 cells, 7 kinds (two encoder cells and two decoder cells repeat): a graph per kind and
    input shape, none per step (the normalised weights are graph inputs, not constants), and a
    new K recompiles only the encoder cells, whose batch is B x (K + 1) slots."""
    graphs = []
    net = compile_network(tiny(), "default", "cpu", k_max=3, backend=counting_backend(graphs))
    views, target = data(4, 3)
    net(views, target)
    assert len(graphs) == len(cell_kinds(views, target)) == 7 < len(compiled_regions(net)) == 9
    net(views, target)
    assert len(graphs) == 7
    net(views[:, :0], target)
    assert len(graphs) == len(cell_kinds(views, target) | cell_kinds(views[:, :0], target)) == 11


def training_step(net) -> list[torch.Tensor]:
    """Loss (with the spectral penalty), gradients and BatchNorm statistics of one step."""
    torch.manual_seed(0)
    views, target = data(4, 3)
    out = net(views, target)
    loss = -out.likelihood.log_prob(target).sum() + out.kl.sum() + SpectralPenalty(net)()
    loss.backward()
    return [loss] + [p.grad for p in net.parameters()] + [b.float() for b in net.buffers()]


def unnormalised(*args):
    raise AssertionError("a conv normalised its own weight")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_step_equals_eager_and_the_regulariser_reuses_its_weights(monkeypatch, checkpointing):
    """Compiled cells take the weights the network normalised (eagerly, all at once) for this
    forward pass, and the spectral regulariser reuses them: no conv normalises its own weight.
    With activation checkpointing the recompute in backward calls the compiled cells again
    (BatchNorm momentum 0: a second graph per kind). The values are the eager ones."""
    monkeypatch.setattr(WNConv2d, "normalized_weight", unnormalised)
    eager = training_step(tiny(activation_checkpointing=checkpointing))
    graphs = counters["stats"]["unique_graphs"]
    net = compile_network(tiny(activation_checkpointing=checkpointing), "default", "cpu", backend="aot_eager")
    for a, b in zip(training_step(net), eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs == 7 * (2 if checkpointing else 1)


def test_the_forward_weights_keep_the_parameters_strides():
    """The normalised weights have their parameter's strides, also for depthwise and 1x1 convs
    (contiguous in both layouts): inductor lays out a conv's backward by them, and with a
    contiguous depthwise weight among channels_last activations it took 3-4x longer on this CPU."""
    net = tiny()
    net(*data(2, 1))
    convs = [m for m in net.modules() if isinstance(m, WNConv2d)]
    assert any(c.weight.shape[1] == 1 for c in convs)  # a depthwise conv is among them
    assert all(c.given_weight.stride() == c.weight.stride() for c in convs)


def test_sampling_stays_eager_and_eval_has_its_own_graphs():
    graphs = []
    net = compile_network(tiny(), "default", "cpu", k_max=3, backend=counting_backend(graphs))
    keys = set(tiny().state_dict())
    views, target = data(4, 3)
    net(views, target)
    compiled = len(graphs)
    torch.manual_seed(1)
    sample = net(views, t=0.5).likelihood.mean()
    net(views, target, repeats=2)  # importance sampling
    assert len(graphs) == compiled
    eager = tiny()
    eager(views, target)  # the same BatchNorm statistics as net's
    torch.manual_seed(1)
    torch.testing.assert_close(sample, eager(views, t=0.5).likelihood.mean())
    net.eval()
    net(views, target)  # eval mode: BatchNorm uses its running statistics, a graph of its own per kind
    assert len(graphs) == 2 * compiled
    assert set(net.state_dict()) == keys  # checkpoints load into compiled and eager modules alike
    assert compile_network(net, "default", "cpu") is net and is_compiled(net)
    assert torch._dynamo.config.cache_size_limit >= 9 * 8 * 4  # cells x graphs per K x (k_max + 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="reduce-overhead", device_type="cpu"), r"model\.compile_mode=reduce-overhead needs CUDA graphs"),
        (dict(mode="max-autotune", device_type="cuda"), r"model\.compile_mode must be one of default, reduce-overhead"),
    ],
)
def test_unsupported_modes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compile_network(tiny(), **kwargs)


def test_inductor_settings():
    """Channels_last layouts also in backward graphs for a channels_last network; no CUDA graphs of
    the cells' own, also for reduce-overhead (the step's graph holds them)."""
    assert inductor_options(True) == {"force_layout_optimization": True}
    assert inductor_options(False) == {"force_layout_optimization": False}


def fit(data_dir, out, *overrides):
    """A fast-dev-run with K = 0..1: one training and one validation batch."""
    cfg = compose_cfg(
        "train",
        [*TINY, "debug=fdr", "dataset.k_max=1", f"paths.data_dir={data_dir}", f"paths.output_dir={out}", *overrides],
    )
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    return model, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_compiled_fast_dev_run_matches_eager(data_dir, tmp_path, monkeypatch):
    """One training and one validation batch (K = 0..1) through ``model.compile=true``: the same
    training loss (with the spectral regulariser on the forward's weights) on the same fixed batch,
    and the same NELBOs, as the eager run (same seed, so the same K, data and posterior noise)."""
    monkeypatch.setenv("FUSIONVAE_COMPILE_BACKEND", "aot_eager")
    eager_model, eager = fit(data_dir, tmp_path / "eager")
    graphs = counters["stats"]["unique_graphs"]
    model, compiled = fit(data_dir, tmp_path / "compiled", "model.compile=true")
    # training: the 7 kinds at one K; validation (eval mode, its batch size): 7 at K = 0 and the 4
    # encoder cells again at K = 1
    assert counters["stats"]["unique_graphs"] - graphs == 7 + 7 + 4
    assert is_compiled(model.net) and not is_compiled(eager_model.net)
    assert model.net._fusionvae_compiled == ("default", "aot_eager")
    for key in ["train/loss", "train/nelbo", "train/kl", "val/nelbo_k0", "val/nelbo_k1"]:
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-5), key
    assert set(model.state_dict()) == set(eager_model.state_dict())


def test_reduce_overhead_on_cpu_fails_before_training(data_dir, tmp_path):
    cfg = compose_cfg(
        "train",
        [
            *TINY,
            "debug=fdr",
            "trainer=cpu",
            "model.compile=true",
            "model.compile_mode=reduce-overhead",
            f"paths.data_dir={data_dir}",
            f"paths.output_dir={tmp_path}",
        ],
    )
    datamodule, model, trainer = build(cfg)
    with pytest.raises(ValueError, match=r"model\.compile_mode=reduce-overhead needs CUDA graphs .* on 'cpu'"):
        trainer.fit(model, datamodule=datamodule)
    assert model.train_batches == 0


def test_resume_may_switch_compile_on_or_off(tmp_path):
    """``compile`` / ``compile_mode`` do not change the weights: resuming with other values is allowed."""
    from fusionvae.training.resume import check_model

    model = compose_cfg("train", [*TINY, "model.compile=true", "model.compile_mode=reduce-overhead"]).model
    hparams = {**compose_cfg("train", TINY).model, "compile": False, "compile_mode": "default"}
    check_model(hparams, model, tmp_path / "last.ckpt")  # no error
