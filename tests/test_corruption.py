"""Ellipse-window corruption (datamodules/corruption.py, docs/design.md §2)."""

from __future__ import annotations

import math

import pytest
import torch

from datamodules.corruption import check_corruption, corrupt, ellipse_masks, make_stack

MNIST = dict(n_ellipses=2, r_low=5, r_high=10)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_and_dtypes() -> None:
    images = torch.rand(5, 3, 16, 24)
    masks = ellipse_masks(5, 4, 16, 24, 3, 2, 6, _gen())
    assert masks.shape == (5, 4, 1, 16, 24) and masks.dtype == torch.bool
    views = corrupt(images, 4, n_ellipses=3, r_low=2, r_high=6, noise_std=0.1, generator=_gen())
    assert views.shape == (5, 4, 3, 16, 24) and views.dtype == torch.float32
    stack = make_stack(images, 4, generator=_gen(), n_ellipses=3, r_low=2, r_high=6)
    assert stack.shape == (5, 5, 3, 16, 24)
    assert torch.equal(stack[:, -1], images)  # clean target last


def _official_view(img: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, std: float) -> torch.Tensor:
    """The official FusionVAE formula, element by element: mask the image, then add noise to every
    pixel (inside and outside the windows) and clip to [0, 1]."""
    return torch.minimum(torch.maximum(img * mask.float() + std * noise, torch.zeros(())), torch.ones(()))


def test_views_follow_the_official_formula_exactly() -> None:
    images = torch.rand(8, 1, 32, 32)
    views = corrupt(images, 3, noise_std=0.25, generator=_gen(1), **MNIST)
    g = _gen(1)
    masks = ellipse_masks(8, 3, 32, 32, generator=g, **MNIST)  # the masks are drawn first,
    noise = torch.randn((8, 3, 1, 32, 32), generator=g)  # then one noise map per view
    assert torch.allclose(views, _official_view(images.unsqueeze(1), masks, noise, 0.25), atol=1e-6, rtol=0)
    assert views.min() >= 0 and views.max() <= 1


def test_noise_covers_the_pixels_outside_the_windows() -> None:
    """Outside a window a pixel is max(0, 0.25 N(0, 1)): mean 0.25 / sqrt(2 pi) ~ 0.0997, half non-zero."""
    images = torch.ones(400, 1, 32, 32)
    views = corrupt(images, 3, noise_std=0.25, generator=_gen(5), **MNIST)
    outside = views[~ellipse_masks(400, 3, 32, 32, generator=_gen(5), **MNIST).expand_as(views)]
    assert outside.numel() > 500_000
    assert abs(outside.mean().item() - 0.25 / math.sqrt(2 * math.pi)) < 0.001
    assert abs((outside > 0).float().mean().item() - 0.5) < 0.003


def test_no_noise_keeps_visible_pixels() -> None:
    images = torch.rand(6, 1, 32, 32)
    views = corrupt(images, 3, noise_std=0.0, generator=_gen(2), **MNIST)
    masks = ellipse_masks(6, 3, 32, 32, generator=_gen(2), **MNIST)
    assert torch.equal(views, images.unsqueeze(1) * masks)


def test_rgb_mask_and_noise_shared_across_channels() -> None:
    grey = torch.rand(4, 1, 20, 20)
    rgb = grey.expand(4, 3, 20, 20)
    views = corrupt(rgb, 2, n_ellipses=4, r_low=0, r_high=8, noise_std=0.3, generator=_gen(3))
    assert torch.equal(views[:, :, 0], views[:, :, 1]) and torch.equal(views[:, :, 0], views[:, :, 2])
    # Distinct channels: the same pixels are blanked in every channel.
    views = corrupt(torch.rand(4, 3, 20, 20) + 0.5, 2, n_ellipses=4, r_low=0, r_high=8, generator=_gen(3))
    zero = views == 0
    assert torch.equal(zero[:, :, 0], zero[:, :, 1]) and torch.equal(zero[:, :, 0], zero[:, :, 2])


def test_single_ellipse_matches_formula() -> None:
    n, views, h, w = 3, 4, 24, 32
    masks = ellipse_masks(n, views, h, w, 1, 3, 9, _gen(4))
    # Redraw the parameters in the documented order: radius, row centre, column centre, elongation.
    g, shape = _gen(4), (n, views)
    r = torch.randint(3, 9, shape, generator=g)
    cx = torch.randint(1, h - 2, shape, generator=g)
    cy = torch.randint(1, w - 2, shape, generator=g)
    e = torch.rand(shape, generator=g) + 0.5
    assert r.min() >= 3 and r.max() < 9 and e.min() >= 0.5 and e.max() < 1.5
    for a in range(n):
        for v in range(views):
            ra, ca, cb, ea = r[a, v].item(), cx[a, v].item(), cy[a, v].item(), e[a, v].item()
            expected = torch.tensor(
                [[math.sqrt(ea * (i - ca) ** 2 + (j - cb) ** 2 / ea) <= ra for j in range(w)] for i in range(h)]
            )
            mismatch = (masks[a, v, 0] != expected).nonzero().tolist()
            # float rounding may only flip pixels lying exactly on the boundary
            for i, j in mismatch:
                assert abs(ea * (i - ca) ** 2 + (j - cb) ** 2 / ea - ra * ra) < 1e-4
            assert masks[a, v, 0, ca, cb]  # the centre is always visible


def test_fixed_radius_ellipse_area_is_pi_r_squared() -> None:
    # e x^2 + y^2 / e <= r^2 has area pi r^2 whatever e (semi-axes r / sqrt(e), r sqrt(e)).
    n, res, r = 64, 200, 30
    masks = ellipse_masks(n, 1, res, res, 1, r, r + 1, _gen(5))
    g = _gen(5)
    torch.randint(r, r + 1, (n,), generator=g)  # radius draw
    cx, cy = torch.randint(1, res - 2, (n,), generator=g), torch.randint(1, res - 2, (n,), generator=g)
    reach = math.ceil(r * math.sqrt(1.5))  # no ellipse extends further than this from its centre
    inside = (torch.minimum(cx, cy) >= reach) & (torch.maximum(cx, cy) < res - reach)
    assert inside.sum() >= 16
    area = masks.sum(dim=(1, 2, 3, 4)).float()[inside]
    assert torch.allclose(area, torch.full_like(area, math.pi * r * r), rtol=0.02)
    assert (masks.sum(dim=(1, 2, 3, 4))[~inside] <= math.pi * r * r * 1.02).all()


@pytest.mark.parametrize("r_low, r_high", [(5, 5), (10, 5)])
def test_empty_radius_range_raises(r_low: int, r_high: int) -> None:
    with pytest.raises(ValueError, match="r_high"):
        ellipse_masks(1, 1, 32, 32, 2, r_low, r_high)
    with pytest.raises(ValueError, match="r_high"):
        corrupt(torch.rand(1, 1, 32, 32), 1, n_ellipses=2, r_low=r_low, r_high=r_high)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="too small"):
        ellipse_masks(1, 1, 3, 32, 2, 1, 2)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        corrupt(torch.rand(1, 32, 32), 1, **MNIST)


def test_same_seed_same_output() -> None:
    images = torch.rand(4, 1, 32, 32)
    a = make_stack(images, 3, generator=_gen(7), noise_std=0.25, **MNIST)
    b = make_stack(images, 3, generator=_gen(7), noise_std=0.25, **MNIST)
    c = make_stack(images, 3, generator=_gen(8), noise_std=0.25, **MNIST)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_used_without_generator() -> None:
    images = torch.rand(4, 1, 32, 32)
    torch.manual_seed(11)
    a = corrupt(images, 3, noise_std=0.25, **MNIST)
    b = corrupt(images, 3, noise_std=0.25, **MNIST)
    torch.manual_seed(11)
    assert torch.equal(a, corrupt(images, 3, noise_std=0.25, **MNIST))
    assert not torch.equal(a, b)


def test_visible_fraction_plausible_for_mnist() -> None:
    masks = ellipse_masks(2000, 3, 32, 32, generator=_gen(9), **MNIST)
    per_view = masks.float().mean(dim=(2, 3, 4))
    # Two windows of mean area ~pi * 51 px on 1024 px, minus overlap and clipping: about a quarter.
    assert 0.18 < per_view.mean() < 0.32
    assert per_view.min() > 0.05 and per_view.max() < 0.5


def test_radius_zero_shows_exactly_the_centre_pixels() -> None:
    n, views, k, h, w = 3, 2, 3, 12, 10
    masks = ellipse_masks(n, views, h, w, k, 0, 1, _gen(12))
    g, shape = _gen(12), (n, views, k)
    torch.randint(0, 1, shape, generator=g)  # radius draw: always 0
    cx, cy = torch.randint(1, h - 2, shape, generator=g), torch.randint(1, w - 2, shape, generator=g)
    expected = torch.zeros(n, views, 1, h, w, dtype=torch.bool)
    for a in range(n):
        for v in range(views):
            for e in range(k):
                expected[a, v, 0, cx[a, v, e], cy[a, v, e]] = True
    assert torch.equal(masks, expected)


def test_smallest_allowed_image_is_4x4() -> None:
    masks = ellipse_masks(2, 1, 4, 4, 1, 1, 3, _gen(13))
    assert masks.shape == (2, 1, 1, 4, 4) and masks.any()
    with pytest.raises(ValueError, match=r"^image 4x3 is too small for ellipse windows \(need >= 4x4\)$"):
        ellipse_masks(1, 1, 4, 3, 1, 1, 3)


def test_noise_free_views_draw_no_noise() -> None:
    """noise_std 0 consumes only the mask draws: the next item's masks do not depend on it."""
    images = torch.rand(4, 1, 32, 32)
    g = _gen(14)
    views = corrupt(images, 2, noise_std=0.0, generator=g, **MNIST)
    ref = _gen(14)
    masks = ellipse_masks(4, 2, 32, 32, generator=ref, **MNIST)
    assert torch.equal(views, images.unsqueeze(1) * masks)
    assert torch.equal(torch.rand(8, generator=g), torch.rand(8, generator=ref))


def test_check_corruption_returns_the_corrupt_arguments() -> None:
    assert check_corruption(1, 0, 1, 0.0) == dict(n_ellipses=1, r_low=0, r_high=1, noise_std=0.0)
    assert check_corruption(2, 5, 10, 0.5) == dict(n_ellipses=2, r_low=5, r_high=10, noise_std=0.5)
    views = corrupt(torch.rand(2, 1, 32, 32), 3, generator=_gen(15), **check_corruption(2, 5, 10, 0.25))
    assert views.shape == (2, 3, 1, 32, 32)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 5, 10, 0.1), r"^dataset\.n_ellipses must be >= 1, got 0$"),
        ((2, -1, 10, 0.1), r"^need 0 <= dataset\.r_low < dataset\.r_high, got r_low=-1, r_high=10$"),
        ((2, 5, 5, 0.1), r"^need 0 <= dataset\.r_low < dataset\.r_high, got r_low=5, r_high=5$"),
        ((2, 6, 5, 0.1), r"^need 0 <= dataset\.r_low < dataset\.r_high, got r_low=6, r_high=5$"),
        ((2, 5, 10, -0.1), r"^dataset\.noise_std must be >= 0, got -0\.1$"),
    ],
)
def test_check_corruption_rejects_bad_settings(args, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_corruption(*args)
