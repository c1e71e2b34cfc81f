"""Importance objects: exact scores on hand-checkable cases, one interface for every space."""
import pytest
import torch
from torch import nn

from sparsebench.training.channels import ChannelSpace
from sparsebench.training.importance import MagnitudeImportance, RandomImportance, TaylorImportance
from sparsebench.training.vit_units import ViTUnitSpace, head_l1_scores, mlp_l1_scores


def test_l1_magnitude_matches_vit_head_and_neuron_norms(cpu_model_factory):
    model = cpu_model_factory("vit_cifar_tiny")
    space = ViTUnitSpace(model, (3, 16, 16))
    scores = MagnitudeImportance(p=1)(model, space)
    heads, mlp = head_l1_scores(model), mlp_l1_scores(model)
    for s, g in zip(scores, space.groups):
        ref = heads[g.block] if g.kind == "heads" else mlp[g.block]
        assert torch.allclose(s, ref, rtol=1e-5)


def test_magnitude_on_a_plain_cnn_is_the_filter_norm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with torch.no_grad():
        for c in range(4):
            model[0].weight[c].fill_(float(c + 1))
    space = ChannelSpace(model, (3, 8, 8))
    [l1] = MagnitudeImportance(p=1)(model, space)
    [l2] = MagnitudeImportance(p=2)(model, space)
    n = 3 * 3 * 3
    assert torch.allclose(l1, torch.tensor([1.0, 2, 3, 4]) * n)
    assert torch.allclose(l2, torch.tensor([1.0, 2, 3, 4]) * n ** 0.5)


def test_taylor_is_abs_sum_of_weight_times_grad_and_needs_gradients():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    space = ChannelSpace(model, (3, 8, 8))
    with pytest.raises(RuntimeError, match="needs gradients"):
        TaylorImportance()(model, space)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    [scores] = TaylorImportance()(model, space)
    w, g = model[0].weight, model[0].weight.grad
    assert torch.allclose(scores, (w * g).flatten(1).sum(1).abs().detach())
    elem = TaylorImportance().elementwise({"w": w})["w"]
    assert torch.allclose(elem, (w * g).abs())


def test_random_importance_is_seeded():
    space_like = type("S", (), {"groups": [type("G", (), {"size": 5})(), type("G", (), {"size": 3})()]})()
    a = RandomImportance(torch.Generator().manual_seed(1))(None, space_like)
    b = RandomImportance(torch.Generator().manual_seed(1))(None, space_like)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and [len(x) for x in a] == [5, 3]
