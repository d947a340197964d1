"""``HostWaits`` finds the ops that make the host wait for the device, on the CPU, by what they are."""

import pytest
import torch

from fusionvae.training.host_waits import HostWaits

x = torch.randn(6, 3)
mask = x[:, 0] > 0
repeats = torch.tensor([1, 2, 3])

WAITS = {  # what each one waits for
    "int()": (lambda: int(x.sum()), "aten._local_scalar_dense"),
    "bool()": (lambda: bool(x.sum() > 0), "aten._local_scalar_dense"),
    ".item()": (lambda: x.sum().item(), "aten._local_scalar_dense"),
    "x[mask]": (lambda: x[mask], "aten.index"),
    "x[mask] = 0": (lambda: x.clone().__setitem__(mask, 0.0), "aten.index_put_"),
    "nonzero": (lambda: torch.nonzero(x), "aten.nonzero"),
    "where(cond)": (lambda: torch.where(mask), "aten.nonzero"),
    "unique": (lambda: torch.unique(x), "aten._unique2"),
    "equal": (lambda: torch.equal(x, x), "aten.equal"),
    "repeat_interleave": (lambda: torch.repeat_interleave(torch.ones(3), repeats), "aten.repeat_interleave"),
}

NO_WAITS = {  # static shapes, values stay on the device
    "repeat_interleave(output_size=)": lambda: torch.repeat_interleave(torch.ones(3), repeats, output_size=6),
    "x[int index]": lambda: x[torch.tensor([0, 2])],
    "index_put_(int index)": lambda: x.clone().index_put_((torch.tensor([0]),), torch.zeros(3)),
    "where(cond, a, b)": lambda: torch.where(mask[:, None], x, 0.0),
    "masked_fill": lambda: x.masked_fill(mask[:, None], 0.0),
    "isfinite().all()": lambda: torch.isfinite(x).all(),
    ".to(float64)": lambda: x.to(torch.float64),
}


@pytest.mark.parametrize("name", WAITS)
def test_an_op_that_waits_for_the_device_is_found(name):
    run, op = WAITS[name]
    with HostWaits() as waits:
        run()
    assert waits.ops == [op]


@pytest.mark.parametrize("name", NO_WAITS)
def test_an_op_that_does_not_wait_is_not_counted(name):
    with HostWaits() as waits:
        NO_WAITS[name]()
    assert waits.ops == []


def test_the_ops_are_listed_in_call_order_and_the_results_are_unchanged():
    with HostWaits() as waits:
        value = x.sum().item()
        picked = x[mask]
    assert waits.ops == ["aten._local_scalar_dense", "aten.index"]
    assert value == x.sum().item() and torch.equal(picked, x[mask])


def test_a_copy_to_the_host_waits_unless_it_is_non_blocking_into_page_locked_memory():
    """Judged from the arguments alone (a ``meta`` tensor stands for one on a GPU). Page-locked memory
    needs CUDA, so that case stands in for ``is_pinned`` too."""
    from unittest import mock

    from fusionvae.training.host_waits import waits_for_device

    aten = torch.ops.aten
    on_device, host = torch.empty(3, device="meta"), torch.empty(3)
    assert waits_for_device(aten._to_copy.default, (on_device,), {"device": torch.device("cpu")})
    assert not waits_for_device(aten._to_copy.default, (host,), {"device": torch.device("cpu")})
    assert not waits_for_device(aten._to_copy.default, (host,), {"device": torch.device("meta")})  # to the device
    assert waits_for_device(aten.copy_.default, (host, on_device), {})
    assert waits_for_device(aten.copy_.default, (host, on_device, True), {})  # pageable: waits anyway
    with mock.patch.object(torch.Tensor, "is_pinned", lambda self: True):
        assert not waits_for_device(aten.copy_.default, (host, on_device, True), {})
        assert waits_for_device(aten.copy_.default, (host, on_device, False), {})
    assert not waits_for_device(aten.copy_.default, (on_device, host), {})  # to the device
