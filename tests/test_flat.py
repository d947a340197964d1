"""fusionvae.training.flat: parameters, gradients and buffers backed by one contiguous buffer each."""

import pytest
import torch
import torch.nn as nn

from fusionvae.training.flat import FlatGradients, flat_buffers, flat_parameters, flatten, is_flat, memory_order


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


def accumulate_grad_ops(net, x) -> list[str]:
    """The ATen ops autograd runs to store the gradients of one backward pass."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        net(x).square().sum().backward()
    return [
        e.name
        for e in prof.events()
        if e.name.startswith("aten::") and "AccumulateGrad" in str(e.cpu_parent and e.cpu_parent.name)
    ]


def test_gradients_are_gathered_into_the_flat_gradient_with_one_cat_and_no_adds():
    net = model()
    flat = flat_parameters(net)
    grads = FlatGradients(net, flat)
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    flat.grad.fill_(7.0)  # the last step's gradients: replaced, not added to
    grads.release()
    assert all(p.grad is None for p in net.parameters())
    assert set(accumulate_grad_ops(net, x)) == {"aten::detach"}  # stored as computed: no add into a buffer
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert grads.gather() is flat.grad
    views = {"aten::permute", "aten::reshape", "aten::view", "aten::_reshape_alias", "aten::slice", "aten::as_strided"}
    top = [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    assert [name for name in top if name not in views] == ["aten::cat"]  # nothing copied but by the cat
    reference = model()
    reference(x).square().sum().backward()
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)  # the channels_last strides read back right
    assert is_flat(flat.grad, [p.grad for p in net.parameters()])  # each .grad its slice again
    torch.testing.assert_close(
        torch.linalg.vector_norm(flat.grad),
        torch.linalg.vector_norm(torch.cat([q.grad.flatten() for q in reference.parameters()])),
    )


def test_parameters_without_a_gradient_get_zeros():
    net = model()
    flat = flat_parameters(net)
    grads = FlatGradients(net, flat)
    flat.grad.fill_(7.0)
    grads.release()
    net[0](torch.randn(2, 3, 6, 6)).sum().backward()  # only the first conv takes part
    grads.gather()
    assert (
        torch.all(net[0].weight.grad != 7) and torch.all(net[2].weight.grad == 0) and torch.all(net[1].bias.grad == 0)
    )


def test_memory_order_is_the_contiguous_permutation():
    nhwc = torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert memory_order(nhwc) == [0, 2, 3, 1] and nhwc.permute(memory_order(nhwc)).is_contiguous()
    assert memory_order(torch.zeros(4, 5)) == [0, 1] and memory_order(torch.zeros(())) == []


def test_flat_gradients_refuse_parameters_that_are_not_flat():
    net = model()
    flat = flat_parameters(net)
    net.to(torch.float64)
    with pytest.raises(ValueError, match="FlatGradients needs the parameters that flat_parameters"):
        FlatGradients(net, flat)


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
