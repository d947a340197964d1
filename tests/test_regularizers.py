import torch
import torch.nn as nn

from fusionvae.model.layers import WNConv2d
from fusionvae.model.objective import balanced_kl, kl_balance_alpha, kl_warmup
from fusionvae.model.regularizers import BatchNormPenalty, SpectralPenalty, power_iteration
from fusionvae.training.optim import warmup_cosine


def test_power_iteration_matches_linalg_spectral_norm():
    torch.manual_seed(0)
    w = torch.randn(3, 16, 40)
    u = torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
    v = torch.nn.functional.normalize(torch.randn(3, 40), dim=1)
    u, v = power_iteration(w, u, v, steps=200)
    sigma = torch.einsum("gm,gmn,gn->g", u, w, v)
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(w, ord=2), rtol=1e-4, atol=1e-4)


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = WNConv2d(3, 4, 3)
        self.b = WNConv2d(3, 4, 3)
        self.c = WNConv2d(4, 2, 1)
        self.bn = nn.BatchNorm2d(4)


def test_spectral_penalty_sums_spectral_norms_and_persists_state():
    torch.manual_seed(0)
    model = TwoConvs()
    pen = SpectralPenalty(model, init_steps=100, steps=50)
    value = pen()
    expected = sum(
        torch.linalg.matrix_norm(m.normalized_weight().flatten(1), ord=2) for m in (model.a, model.b, model.c)
    )
    torch.testing.assert_close(value.detach(), expected.detach(), rtol=1e-3, atol=1e-3)
    assert len(pen.groups) == 2  # (4,3,3,3) twice, stacked, and (2,4,1,1)
    value.backward()
    assert model.a.weight.grad is not None and model.c.log_g.grad is not None
    # u / v are buffers: they round-trip through a state dict
    state = pen.state_dict()
    assert {"u0", "v0", "u1", "v1", "initialised"} <= set(state)
    fresh = SpectralPenalty(model)
    fresh.load_state_dict(state)
    fresh.eval()  # no iteration in eval: the loaded vectors alone give the value
    torch.testing.assert_close(fresh().detach(), expected.detach(), rtol=1e-3, atol=1e-3)


def test_batchnorm_penalty_is_linf_of_gammas():
    model = TwoConvs()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.5, -3.0, 1.0, 2.0]))
    assert BatchNormPenalty(model)().item() == 3.0


def test_kl_warmup_schedule():
    assert kl_warmup(0, 1000) == 1e-4
    assert kl_warmup(150, 1000) == 0.5
    assert kl_warmup(300, 1000) == 1.0 and kl_warmup(900, 1000) == 1.0


def test_kl_balancing():
    alpha = kl_balance_alpha([2, 5])  # top scale 2 groups, next 5
    torch.testing.assert_close(alpha, torch.tensor([1.0, 1.0, 1.6, 1.6, 1.6, 1.6, 1.6]))  # (4/5) / (1/2)
    kl = torch.rand(4, 7, requires_grad=True)
    weighted, gamma = balanced_kl(kl, alpha, beta=0.5)
    assert abs(gamma.mean().item() - 1) < 1e-6
    weighted.sum().backward()
    # gammas are constants: d/dKL = beta * gamma
    torch.testing.assert_close(kl.grad, 0.5 * gamma.expand(4, -1))
    full, ones = balanced_kl(kl, alpha, beta=1.0)
    torch.testing.assert_close(full, kl.sum(1))
    assert (ones == 1).all()


def test_warmup_cosine_lr():
    lr, lr_min = 1e-2, 1e-4
    f = lambda s: warmup_cosine(s, 10, 110, lr, lr_min) * lr  # noqa: E731
    assert f(0) == lr / 10 and abs(f(9) - lr) < 1e-12
    assert abs(f(60) - (lr + lr_min) / 2) < 1e-9
    assert abs(f(110) - lr_min) < 1e-12 and abs(f(500) - lr_min) < 1e-12


def test_the_forward_pass_normalises_all_weights_together_and_the_regulariser_reuses_them():
    """One stack per weight shape (layers.normalise_together): the same weights each conv would
    normalise on its own, the layout kept, and the regulariser's [G, out, in k k] from that stack."""
    from fusionvae.model.layers import WNConv2d, stacked_weights, weight_norm_groups
    from fusionvae.model.network import FusionVAE
    from tests.test_network import TINY

    torch.manual_seed(0)
    net = FusionVAE(**TINY)
    net(torch.rand(2, 3, 1, 32, 32), torch.rand(2, 1, 32, 32))
    convs = [m for m in net.modules() if isinstance(m, WNConv2d)]
    for c in convs:
        own = c.normalized_weight()
        torch.testing.assert_close(c.given_weight, own, rtol=1e-5, atol=1e-6)
        cl = torch.channels_last
        assert c.given_weight.is_contiguous(memory_format=cl) == own.is_contiguous(memory_format=cl)  # layout kept
    groups = weight_norm_groups(net)
    assert len(groups) < len(convs) and sum(map(len, groups)) == len(convs)  # the paper model: far fewer
    for group in groups:
        fresh = torch.stack([c.normalized_weight().flatten(1) for c in group])
        torch.testing.assert_close(stacked_weights(group), fresh, rtol=1e-5, atol=1e-6)
    penalty = SpectralPenalty(net)
    penalty.start_step()
    assert all(c.given_weight is None and c.given_group is None for c in convs)


def test_rows_are_normalised_together_as_f_normalize_would_each_back_to_back_or_not():
    from fusionvae.model.regularizers import _normalise_rows, _span

    torch.manual_seed(0)
    parts = [torch.randn(3, 4), torch.randn(2, 5), torch.zeros(1, 2)]  # a zero row: divided by eps
    x = torch.cat([p.reshape(-1) for p in parts])
    rows = torch.tensor([4, 4, 4, 5, 5, 2])
    expected = [torch.nn.functional.normalize(p, dim=1, eps=1e-3) for p in parts]
    apart = [torch.empty_like(p) for p in parts]
    _normalise_rows(x, rows, apart)
    backing = torch.empty(x.numel())
    together = [backing[:12].view(3, 4), backing[12:22].view(2, 5), backing[22:].view(1, 2)]
    assert _span(apart) is None and _span(together).data_ptr() == backing.data_ptr()
    _normalise_rows(x, rows, together)
    for got in (apart, together):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)


def test_one_training_step_of_the_penalty_is_one_power_iteration_and_u_w_v():
    """The per-shape formula the batched one replaced: v = n(W^T u), u = n(W v), penalty u^T W v."""
    torch.manual_seed(0)
    model = TwoConvs()
    pen = SpectralPenalty(model, init_steps=1, steps=1)
    u0 = [pen.u0.clone(), pen.u1.clone()]
    value = pen()
    n = torch.nn.functional.normalize
    expected = 0.0
    for i, convs in enumerate(pen.groups):
        w = torch.stack([c.normalized_weight().flatten(1) for c in convs])
        v = n(torch.bmm(u0[i].unsqueeze(1), w).squeeze(1), dim=1, eps=1e-3)
        u = n(torch.bmm(w, v.unsqueeze(2)).squeeze(2), dim=1, eps=1e-3)
        torch.testing.assert_close(getattr(pen, f"u{i}"), u)
        torch.testing.assert_close(getattr(pen, f"v{i}"), v)
        expected = expected + torch.einsum("gm,gmn,gn->", u, w, v)
    torch.testing.assert_close(value, expected)
    assert [k for k in pen.state_dict() if k[0] in "uv"] == ["u0", "u1", "v0", "v1"]  # no row-length keys


def test_the_step_engine_keeps_the_vectors_back_to_back():
    from fusionvae.model.regularizers import _span
    from fusionvae.training.flat import flat_buffers

    pen = SpectralPenalty(TwoConvs())
    flat_buffers(list(pen.buffers()))  # as SkipSafeStep.begin keeps a module's buffers
    assert _span(pen._vectors("u")) is not None and _span(pen._vectors("v")) is not None
