import pytest
import torch
from torch import nn

from sparsebench.specs import Recipe
from sparsebench.training.trainer import Trainer
from sparsebench.training.masks import (
    MaskSet, global_topk_masks, keep_counts, layer_densities, layerwise_topk_masks, prunable_weights, topk_mask,
)


def test_topk_is_exact_under_ties():
    scores = torch.zeros(100)
    scores[:10] = 1.0
    for keep in (0, 5, 10, 37, 100):
        mask = topk_mask(scores, keep, torch.Generator().manual_seed(0))
        assert int(mask.sum()) == keep
    assert topk_mask(scores, 10).nonzero().flatten().tolist() == list(range(10))


def test_prunable_weights_skip_first_and_last(cpu_model_factory):
    model = cpu_model_factory("resnet20_tiny")
    names = list(prunable_weights(model))
    assert names[0] == "conv1.weight" and names[-1] == "fc.weight"
    assert list(prunable_weights(model, skip_first=True, skip_last=True)) == names[1:-1]


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
def test_erk_meets_the_global_budget_and_caps_density(cpu_model_factory, sparsity):
    params = prunable_weights(cpu_model_factory("resnet20_tiny"))
    densities = layer_densities(params, sparsity, "erk")
    counts = keep_counts(params, densities)
    total = sum(p.numel() for p in params.values())
    assert max(densities.values()) <= 1.0
    assert abs(sum(counts.values()) - (1 - sparsity) * total) <= len(params)
    # ERK gives small layers (the 3-channel stem) more density than large ones
    assert densities["conv1.weight"] > densities["layer3.0.conv2.weight"]


def test_global_topk_keeps_exact_count_and_largest_values():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(10, 10, generator=g), "b": torch.rand(50, generator=g) * 2}
    masks = global_topk_masks(scores, 0.75)
    assert sum(int(m.sum()) for m in masks.values()) == 38      # round(0.25 * 150)
    kept_min = min(float(s[m].min()) for s, m in zip(scores.values(), masks.values()) if m.any())
    dropped_max = max(float(s[~m].max()) for s, m in zip(scores.values(), masks.values()))
    assert kept_min >= dropped_max


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_masks_hold_through_momentum_and_weight_decay(optimizer, precision):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    params = prunable_weights(model)
    masks = MaskSet(model, layerwise_topk_masks({n: p.abs() for n, p in params.items()},
                                                keep_counts(params, layer_densities(params, 0.75))))
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = Trainer(model, loader, Recipe(optimizer=optimizer, weight_decay=0.1, precision=precision),
                      torch.device("cpu"), 2, 0.5, hooks=[masks])
    trainer.restart_schedule(10)
    for _ in range(10):
        trainer.train_step()
        for name, p in masks.params.items():
            assert torch.all(p[~masks.masks[name]] == 0)
            state = trainer.optimizer.state[p]
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                if key in state:
                    assert torch.all(state[key][~masks.masks[name]] == 0)
    assert masks.sparsity() == pytest.approx(0.75, abs=1e-3)
    assert all(p.dtype == torch.float32 for p in masks.params.values())


def test_update_zeroes_grown_weights_and_their_optimizer_state():
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0] = True
    masks = MaskSet(model, {"weight": mask})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.state[model.weight]["momentum_buffer"].fill_(1.0)
    new = torch.zeros(4, 4, dtype=torch.bool)
    new[1] = True
    masks.update("weight", new, opt)
    assert torch.all(model.weight[1] == 0) and torch.all(model.weight[0] == 0)
    assert torch.all(opt.state[model.weight]["momentum_buffer"][1] == 0)
