import pytest
import torch

from fusionvae.model.network import FusionVAE, groups_per_scale

TINY = dict(
    num_channels=4,
    num_preprocess_blocks=1,
    num_postprocess_blocks=1,
    num_latent_scales=2,
    num_groups_per_scale=2,
    num_latent_per_group=2,
    num_mix=3,
)


def tiny(**kw) -> FusionVAE:
    torch.manual_seed(0)
    return FusionVAE(**{**TINY, **kw})


def data(b=3, k=3, c=1, size=32):
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, k, c, size, size, generator=g), torch.rand(b, c, size, size, generator=g)


def test_groups_per_scale():
    assert groups_per_scale(2, 5, True) == [5, 2]
    assert groups_per_scale(3, 10, True) == [10, 5, 2]
    assert groups_per_scale(3, 4, False) == [4, 4, 4]
    assert groups_per_scale(3, 2, True) == [2, 1, 1]


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_shapes_for_every_k(k):
    net = tiny()
    views, target = data()
    out = net(views[:, :k], target)
    assert out.kl.shape == (3, net.num_groups) == (3, 3)
    assert out.log_q.shape == out.log_p.shape == (3,)
    assert out.likelihood.log_prob(target).shape == (3, 32, 32)
    assert torch.isfinite(out.kl).all() and (out.kl >= 0).all()


def test_paper_mnist_config_layout():
    net = FusionVAE()  # defaults = the paper's MNIST sizes
    assert net.groups == [5, 2] and net.num_groups == 7
    assert net.top_state.shape == (1, 64, 4, 4)
    views, target = data(b=2)
    assert net(views, target).likelihood.mean().shape == (2, 1, 32, 32)


def test_rgb_and_bernoulli_likelihoods():
    views, target = data(c=3, size=16)
    out = tiny(channels=3, image_size=16)(views, target)
    assert out.likelihood.sample().shape == (3, 3, 16, 16)
    out = tiny(likelihood="bernoulli")(*data())
    assert out.likelihood.mean().shape == (3, 1, 32, 32)


def test_gradients_reach_every_parameter_across_k():
    net = tiny()
    views, target = data()
    loss = 0
    for k in (0, 3):
        out = net(views[:, :k], target)
        loss = loss + (-out.likelihood.log_prob(target).sum() + out.kl.sum())
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_prior_heads_only_used_without_views():
    net = tiny()
    views, target = data()
    out = net(views, target)
    (-out.likelihood.log_prob(target).sum() + out.kl.sum()).backward()
    heads = [p for g in net.latent_groups if g.prior_head is not None for p in g.prior_head.parameters()]
    # zero, not None: all weights are normalised together (layers.weights_normalised_together)
    assert heads and all(p.grad is None or not p.grad.any() for p in heads)


def test_view_order_does_not_matter():
    net = tiny().eval()
    views, _ = data()
    a = net(views, None, t=0.0).likelihood.mean()
    b = net(views[:, [2, 0, 1]], None, t=0.0).likelihood.mean()
    torch.testing.assert_close(a, b)


def test_views_condition_the_prior():
    net = tiny().eval()
    views, _ = data()
    a = net(views, None, t=0.0).likelihood.mean()
    b = net(torch.rand_like(views), None, t=0.0).likelihood.mean()
    assert (a - b).abs().max() > 1e-4


def test_unconditional_generation_k0():
    net = tiny().eval()
    torch.manual_seed(0)
    out = net(torch.zeros(4, 0, 1, 32, 32), None)
    assert out.likelihood.sample().shape == (4, 1, 32, 32)
    assert (out.kl == 0).all() and torch.isfinite(out.log_p).all()


def test_repeats_share_one_encoder_pass():
    net = tiny().eval()
    views, target = data()
    out = net(views, None, t=0.0, repeats=4)
    mean = out.likelihood.mean().view(3, 4, 1, 32, 32)
    torch.testing.assert_close(mean, mean[:, :1].expand_as(mean))
    torch.testing.assert_close(mean[:, 0], net(views, None, t=0.0).likelihood.mean())
    assert net(views, target, repeats=5).kl.shape == (15, 3)


def test_temperature_zero_is_deterministic_and_one_is_not():
    net = tiny().eval()
    views, _ = data()
    torch.testing.assert_close(net(views, None, t=0.0).likelihood.mean(), net(views, None, t=0.0).likelihood.mean())
    assert (net(views, None, t=1.0).likelihood.mean() - net(views, None, t=1.0).likelihood.mean()).abs().max() > 0


def test_deterministic_fcn_and_residual_posterior_and_skips():
    views, target = data()
    fcn = tiny(stochastic=False).eval()
    out = fcn(views, target)
    assert (out.kl == 0).all()
    torch.testing.assert_close(out.likelihood.mean(), fcn(views, target).likelihood.mean())
    res = tiny(res_dist=True)(views, target)
    assert torch.isfinite(res.kl).all()
    for mode in ("max", "mean"):
        assert torch.isfinite(tiny(skip=mode)(views, target).kl).all()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(aggregation="median"), r"unknown aggregation 'median'.*\(model.aggregation\)"),
        (dict(skip="sum"), r"unknown skip mode 'sum'.*\(model.skip\)"),  # a key that exists (was model.net.skip)
        (dict(likelihood="gauss"), r"unknown likelihood 'gauss'.*\(model.likelihood\)"),
        (dict(image_size=30), "must be divisible by"),
        (dict(num_latent_per_group=0), r"^model.num_latent_per_group must be >= 1"),  # was model.net.<size>
    ],
)
def test_invalid_configs_fail_fast(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kw)


def test_channels_last_64px_rgb_backward():
    # regression: strided 1x1 convs on channels_last inputs corrupted the heap (torch 2.14 CPU)
    net = tiny(channels=3, image_size=64)
    for _ in range(2):
        views, target = data(b=4, c=3, size=64)
        out = net(views, target)
        (-out.likelihood.log_prob(target).sum() + out.kl.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_factorized_reduce_matches_shifted_strided_convs():
    import torch.nn.functional as F

    from fusionvae.model.layers import FactorizedReduce

    fr = FactorizedReduce(4, 8)
    x = torch.randn(2, 4, 16, 16)
    a = F.silu(x)
    shifted = (a, a[:, :, 1:, 1:], a[:, :, :, 1:], a[:, :, 1:, :])
    ref = torch.cat([F.conv2d(s, c.normalized_weight(), c.bias, stride=2) for c, s in zip(fr.convs, shifted)], 1)
    torch.testing.assert_close(fr(x), ref)


def test_checkpoints_from_before_latent_groups_load():
    """Old key layout: five parallel lists (dec_cells.{l}, enc_proj.{l}, heads.{l}, prior_heads.{l},
    combiners.{l}); the load hook renames them to latent_groups.{l}.*."""
    old_names = {
        "cells": "dec_cells",
        "enc_proj": "enc_proj",
        "head": "heads",
        "prior_head": "prior_heads",
        "combiner": "combiners",
    }
    net = tiny()
    legacy = {}
    for key, value in net.state_dict().items():
        parts = key.split(".")
        if parts[0] == "latent_groups":
            key = ".".join([old_names[parts[2]], parts[1], *parts[3:]])
        legacy[key] = value.clone() + 1.0
    assert any(k.startswith("dec_cells.1.") for k in legacy) and not any("latent_groups" in k for k in legacy)
    fresh = tiny()
    fresh.load_state_dict(legacy)
    assert torch.equal(fresh.latent_groups[1].head.bias, net.latent_groups[1].head.bias + 1.0)
    assert torch.equal(fresh.latent_groups[2].prior_head[1].log_g, net.latent_groups[2].prior_head[1].log_g + 1.0)


def test_activation_checkpointing_changes_neither_values_nor_batch_norm_state():
    plain, ckpt = tiny(), tiny(activation_checkpointing=True)
    views, target = data()
    results = []
    for net in (plain, ckpt):
        torch.manual_seed(5)  # the same z draws
        out = net(views, target)
        loss = -out.likelihood.log_prob(target).sum() + out.kl.sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in net.named_parameters()}, net.state_dict()))
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = results
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    for name, value in state_a.items():  # running stats updated once, not again in the recompute
        assert torch.equal(state_b[name], value), name


def test_activation_checkpointing_reads_no_random_state(monkeypatch):
    """Cells draw no random numbers, so checkpointing saves no RNG state for their recompute: a
    CUDA-graph capture of the step (fusionvae.training.step_graph) forbids reading the CUDA
    generator's, and torch would read the CPU one's and the device's for every cell."""

    def forbidden(*args, **kwargs):
        raise AssertionError("an RNG state was read")

    from fusionvae.model import activation_checkpoint
    from fusionvae.model.cells import Cell

    checkpointed = []

    def counted(module, *args, **kwargs):
        checkpointed.append(module)
        return torch.utils.checkpoint.checkpoint(module, *args, **kwargs)

    net = tiny(activation_checkpointing=True)
    views, target = data()
    monkeypatch.setattr(activation_checkpoint, "checkpoint", counted)
    monkeypatch.setattr(torch, "get_rng_state", forbidden)
    monkeypatch.setattr(torch.utils.checkpoint, "get_device_states", forbidden)
    out = net(views, target)
    (-out.likelihood.log_prob(target).sum() + out.kl.sum()).backward()
    cells = [m for m in net.modules() if isinstance(m, Cell)]
    assert len(checkpointed) == len(cells) and all(p.grad is not None for p in cells[-1].parameters())


def test_module_checkpoints_from_before_latent_groups_restart_the_power_iteration(tmp_path):
    from fusionvae.training.module import FusionVAEModule
    from tests.conftest import save_checkpoint

    old_names = {
        "cells": "dec_cells",
        "enc_proj": "enc_proj",
        "head": "heads",
        "prior_head": "prior_heads",
        "combiner": "combiners",
    }
    module = FusionVAEModule(**TINY)
    state = {}
    for key, value in module.state_dict().items():
        parts = key.split(".")
        if parts[:2] == ["net", "latent_groups"]:
            key = ".".join(["net", old_names[parts[3]], parts[2], *parts[4:]])
        state[key] = value
    state["spectral.initialised"] = torch.tensor(True)
    path = save_checkpoint(module, tmp_path / "old.ckpt", state)
    loaded = FusionVAEModule.load_from_checkpoint(path)
    assert torch.equal(loaded.net.latent_groups[1].head.weight, module.net.latent_groups[1].head.weight)
    assert not bool(loaded.spectral.initialised)  # the u / v rows no longer match the conv order
