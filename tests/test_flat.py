"""fusionvae.training.flat: parameters, gradients and buffers backed by one contiguous buffer each."""

import pytest
import torch
import torch.nn as nn

from fusionvae.training.flat import flat_buffers, flat_parameters, flatten, is_flat, zero_gradients


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    return net.to(memory_format=torch.channels_last)


def test_parameters_keep_values_shapes_and_strides_and_share_one_buffer():
    net = model()
    before = {k: (v.clone(), v.stride()) for k, v in net.named_parameters()}
    flat = flat_parameters(net)
    assert flat.numel() == sum(p.numel() for p in net.parameters())
    for name, p in net.named_parameters():
        assert torch.equal(p, before[name][0]) and p.stride() == before[name][1]
    assert is_flat(flat, list(net.parameters())) and is_flat(flat.grad, [p.grad for p in net.parameters()])
    with torch.no_grad():
        flat.add_(1.0)  # an optimiser step on the flat parameter moves every parameter
    assert all(torch.equal(p, before[n][0] + 1) for n, p in net.named_parameters())


def test_gradients_accumulate_into_the_flat_gradient_and_zero_in_one_go():
    net = model()
    flat = flat_parameters(net)
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    net(x).square().sum().backward()
    reference = model()
    reference(x).square().sum().backward()
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    torch.testing.assert_close(
        torch.linalg.vector_norm(flat.grad),
        torch.linalg.vector_norm(torch.cat([q.grad.flatten() for q in reference.parameters()])),
    )
    zero_gradients(net, flat)
    assert torch.all(flat.grad == 0) and all(torch.all(p.grad == 0) for p in net.parameters())


def test_gradients_set_to_none_are_linked_again():
    net = model()
    flat = flat_parameters(net)
    net.zero_grad(set_to_none=True)  # e.g. a library call
    zero_gradients(net, flat)
    assert is_flat(flat.grad, [p.grad for p in net.parameters()])
    flat.grad = None
    zero_gradients(net, flat)
    assert flat.grad is not None and torch.all(flat.grad == 0)
    assert is_flat(flat.grad, [p.grad for p in net.parameters()])


def test_buffers_grouped_by_dtype_and_updated_in_place():
    net = model().train()
    buffers = list(net.buffers())
    flats = flat_buffers(buffers)
    assert {f.dtype for f in flats} == {b.dtype for b in buffers} and len(flats) == 2  # float stats, long counter
    assert sum(f.numel() for f in flats) == sum(b.numel() for b in buffers)
    saved = [f.clone() for f in flats]
    net(torch.randn(2, 3, 6, 6))  # BN updates its running statistics in place
    assert any(not torch.equal(f, s) for f, s in zip(flats, saved))
    torch._foreach_copy_(flats, saved)  # restoring the flat buffers restores the module
    bn = net[1]
    assert int(bn.num_batches_tracked) == 0 and torch.all(bn.running_mean == 0)


def test_moving_a_module_breaks_the_link_and_is_detected():
    net = model()
    flat = flat_parameters(net)
    net.to(torch.float64)
    assert not is_flat(flat, list(net.parameters()))
    assert not is_flat(None, list(net.parameters()))


def test_flatten_refuses_what_it_cannot_view():
    with pytest.raises(ValueError, match="flatten needs a non-empty list of dense tensors"):
        flatten([])
    with pytest.raises(ValueError, match="flatten needs a non-empty list of dense tensors"):
        flatten([torch.zeros(4, 4)[:, ::2]])


def test_flatten_refuses_a_strided_four_dimensional_tensor_and_accepts_channels_last():
    strided = torch.zeros(2, 3, 4, 6)[..., ::2]  # 4-D, neither contiguous nor channels_last
    with pytest.raises(ValueError, match="flatten needs a non-empty list of dense tensors"):
        flatten([strided])
    nhwc = torch.arange(48.0).view(2, 2, 3, 4).to(memory_format=torch.channels_last)
    flat = flatten([nhwc])
    assert torch.equal(nhwc, torch.arange(48.0).view(2, 2, 3, 4)) and nhwc.stride() == (24, 1, 8, 2)
    assert is_flat(flat, [nhwc])


def test_zero_gradients_keeps_linked_gradients_without_relinking():
    net = model()
    flat = flat_parameters(net)
    net(torch.randn(2, 3, 6, 6)).square().sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert flat.grad.abs().sum() > 0
    zero_gradients(net, flat)
    # the same gradient tensors, zeroed in place: nothing relinked while every one is still in flat.grad
    assert all(p.grad is g for p, g in zip(net.parameters(), grads))
    assert torch.all(flat.grad == 0) and all(torch.all(g == 0) for g in grads)
