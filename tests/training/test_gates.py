"""The gating path: binary gates equal fixed masks and the compacted model; gradients reach
the gate parameters and not the frozen model."""
import pytest
import torch

from sparsebench.training.channels import ChannelSpace
from sparsebench.training.gates import straight_through
from sparsebench.training.vit_units import ViTUnitSpace
from tests.conftest import randomize_norms


def _random_keep(space, seed=0, ratio=0.5):
    g = torch.Generator().manual_seed(seed)
    masks = []
    for grp in space.groups:
        m = torch.rand(grp.size, generator=g) < ratio
        m[torch.randint(grp.size, (1,), generator=g)] = True     # never empty a group
        masks.append(m)
    return masks


@pytest.mark.parametrize("model_name", ["resnet20_tiny", "vit_cifar_tiny"])
def test_binary_gates_equal_masks_and_compacted_model(cpu_model_factory, model_name):
    model = cpu_model_factory(model_name)
    if model_name.startswith("resnet"):
        randomize_norms(model)
        space = ChannelSpace(model, (3, 16, 16))
    else:
        space = ViTUnitSpace(model, (3, 16, 16))
    kept = _random_keep(space)
    compact = space.compact(model, kept)
    x = torch.randn(4, 3, 16, 16)
    via_masks = space.check_compaction(model, kept, compact, x, via="masks")
    via_gates = space.check_compaction(model, kept, compact, x, via="gates")
    assert via_masks < 1e-4 and via_gates < 1e-4
    # gates off again: the dense model is untouched
    dense_out = model(x)
    with space.gate(model) as gates:
        assert torch.equal(model(x), dense_out)        # every gate None: no change
        gates.set([torch.ones(g.size) for g in space.groups])
        assert torch.allclose(model(x), dense_out, atol=1e-6)
    assert torch.equal(model(x), dense_out)


@pytest.mark.parametrize("model_name", ["resnet20_tiny", "vit_cifar_tiny"])
def test_gradients_reach_soft_gates_through_straight_through_masks(cpu_model_factory, model_name):
    model = cpu_model_factory(model_name)
    for p in model.parameters():
        p.requires_grad_(False)
    space = ChannelSpace(model, (3, 16, 16)) if model_name.startswith("resnet") else ViTUnitSpace(model, (3, 16, 16))
    assert len(space.groups) >= 3               # frozen parameters still give the dependency groups
    logits = [torch.zeros(g.size, requires_grad=True) for g in space.groups]
    with space.gate(model) as gates:
        soft = [torch.sigmoid(l) for l in logits]
        hard = [(s > 0.4).float() for s in soft]
        gates.set([straight_through(h, s) for h, s in zip(hard, soft)])
        model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(l.grad is not None and l.grad.abs().sum() > 0 for l in logits)
    assert all(p.grad is None for p in model.parameters())


def test_straight_through_forward_is_hard_backward_is_soft():
    soft = torch.tensor([0.2, 0.7], requires_grad=True)
    out = straight_through(torch.tensor([0.0, 1.0]), soft)
    assert out.tolist() == [0.0, 1.0]
    (out * torch.tensor([3.0, 5.0])).sum().backward()
    assert soft.grad.tolist() == [3.0, 5.0]


def test_gate_shapes_are_checked(cpu_model_factory):
    model = cpu_model_factory("resnet20_tiny")
    space = ChannelSpace(model, (3, 16, 16))
    with space.gate(model) as gates, pytest.raises(ValueError, match="units has shape"):
        gates.set([torch.ones(g.size + 1) for g in space.groups])
