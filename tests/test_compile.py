"""``model.compile=true``: the compiled network trains through the Hydra configs and gives the eager
values; one graph per K; sampling stays eager; unsupported settings are refused in one line.

Inductor needs minutes per graph on a 2-core CPU (the tiny model's first training graph: ~165 s),
so the end-to-end test uses the ``aot_eager`` backend (the same Dynamo / AOTAutograd graphs, run by
eager kernels) through ``FUSIONVAE_COMPILE_BACKEND``; tests/test_gpu.py compiles with inductor.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fusionvae.model.layers import WNConv2d
from fusionvae.training.build import build
from fusionvae.training.compile import compile_network, is_compiled
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


def test_one_graph_per_k_and_sampling_stays_eager():
    graphs = []
    net = compile_network(tiny(), "default", "cpu", k_max=3, backend=counting_backend(graphs))
    keys = set(tiny().state_dict())
    views, target = data(4, 3)
    for k in (3, 3, 0, 3):
        net(views[:, :k], target)
    assert len(graphs) == 2  # K = 3 and K = 0, static shapes
    net(views, t=0.5)
    net(views, target, repeats=2)  # importance sampling: eager
    assert len(graphs) == 2
    net.eval()
    net(views, target)  # eval mode: its own graph
    assert len(graphs) == 3
    assert set(net.state_dict()) == keys  # checkpoints load into compiled and eager modules alike
    assert compile_network(net, "default", "cpu") is net and is_compiled(net)
    assert torch._dynamo.config.cache_size_limit >= 16  # 4 per K for K = 0..3


def test_the_forward_weights_keep_the_parameters_strides():
    """The normalised weights have their parameter's strides, also for depthwise and 1x1 convs
    (contiguous in both layouts): inductor lays out a conv's backward by them, and with a
    contiguous depthwise weight among channels_last activations it took 3-4x longer on this CPU."""
    net = tiny()
    net(*data(2, 1))
    convs = [m for m in net.modules() if isinstance(m, WNConv2d)]
    assert any(c.weight.shape[1] == 1 for c in convs)  # a depthwise conv is among them
    assert all(c.given_weight.stride() == c.weight.stride() for c in convs)


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


def test_activation_checkpointing_is_refused():
    with pytest.raises(ValueError, match=r"model\.compile=true does not work with model\.activation_checkpointing"):
        compile_network(tiny(activation_checkpointing=True), "default", "cpu")


def fit(data_dir, out, *overrides):
    """A fast-dev-run with K = 0..1 (k_max=1 keeps it to 3 graphs: training, validation K = 0 and 1)."""
    cfg = compose_cfg(
        "train",
        [*TINY, "debug=fdr", "dataset.k_max=1", f"paths.data_dir={data_dir}", f"paths.output_dir={out}", *overrides],
    )
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    return model, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_compiled_fast_dev_run_matches_eager(data_dir, tmp_path, monkeypatch):
    """One training and one validation batch (K = 0..1) through ``model.compile=true``: the same
    training loss on the same fixed batch, and the same NELBOs, as the eager run (same seed, so the
    same K, data and posterior noise)."""
    monkeypatch.setenv("FUSIONVAE_COMPILE_BACKEND", "aot_eager")
    eager_model, eager = fit(data_dir, tmp_path / "eager")
    graphs = counters["stats"]["unique_graphs"]
    model, compiled = fit(data_dir, tmp_path / "compiled", "model.compile=true")
    assert counters["stats"]["unique_graphs"] - graphs == 3  # training (one K) + validation K = 0, 1
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
