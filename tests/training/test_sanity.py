"""The sanity checks of pruning from a pretrained model (training/sanity.py) and the pipeline's
`reinit`: masks shuffled within each layer, the found structure re-initialised and trained from scratch."""
import pytest
import torch
from torch import nn

from sparsebench.training.sanity import reinitialise, shuffle_within_layers

from conftest import tiny_spec


def test_shuffle_within_layers_keeps_each_layers_count_and_moves_positions():
    g = torch.Generator().manual_seed(0)
    masks = {"a": torch.arange(64).view(8, 8) < 16, "b": torch.arange(10) < 7}
    shuffled = shuffle_within_layers(masks, g)
    assert set(shuffled) == {"a", "b"}
    for name, mask in masks.items():
        assert shuffled[name].shape == mask.shape and shuffled[name].dtype == torch.bool
        assert int(shuffled[name].sum()) == int(mask.sum())                  # per-layer density kept
    assert not torch.equal(shuffled["a"], masks["a"])                         # positions moved
    groups = shuffle_within_layers([torch.tensor([True, True, False, False])] * 3, g)
    assert isinstance(groups, list) and [int(m.sum()) for m in groups] == [2, 2, 2]


def test_reinitialise_draws_fresh_weights_in_the_same_structure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    model.register_parameter("pos_embed", nn.Parameter(torch.ones(1, 3)))     # no module resets it
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    counts = reinitialise(model, torch.Generator().manual_seed(1))
    assert counts == {"modules_reset": 3, "parameters_drawn": 1, "vit_init_weights": 0, "convs_kaiming_fan_out": 1}
    for name, p in model.named_parameters():
        assert p.shape == before[name].shape
    assert not torch.equal(model[0].weight, before["0.weight"]) and not torch.equal(model.pos_embed, before["pos_embed"])
    assert torch.equal(model[1].running_mean, torch.zeros(4))                 # BN statistics reset too
    again = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    reinitialise(again, torch.Generator().manual_seed(1))
    assert torch.equal(again[0].weight, model[0].weight)                      # seeded


@pytest.mark.parametrize("name", ["resnet20_tiny", "vit_cifar_tiny"])
def test_reinitialise_draws_as_the_model_family_initialises(name):
    """A re-initialised model starts where a freshly created one does: the same spread of conv and
    linear weights (Kaiming fan-out for CNN convolutions, timm's truncated normal 0.02 for ViT
    Linear layers), not PyTorch's default Linear/Conv initialisation."""
    from sparsebench.models import create_model

    def spreads(model):
        return {n: float(p.std()) for n, p in model.named_parameters() if p.dim() > 1 and p.numel() > 64}

    torch.manual_seed(0)
    fresh = spreads(create_model(name, img_size=16))
    trained_like = create_model(name, img_size=16)
    with torch.no_grad():
        for p in trained_like.parameters():
            p.mul_(3.0).add_(0.1)                                  # far from any initialisation
    reinitialise(trained_like, torch.Generator().manual_seed(0))
    for n, s in spreads(trained_like).items():
        assert s == pytest.approx(fresh[n], rel=0.25), n


def test_the_reinit_sanity_check_trains_the_found_structure_from_scratch(tmp_path):
    """pass[sanity=reinit] through the pipeline: the searched structure, fresh weights, trained for
    the dense pretrain + fine-tune steps at the pretrain rate; marked as its signal control."""
    from sparsebench.runners.pipeline import RunOptions, execute

    record = execute(tiny_spec("pass", target="flops=0.5", method_args=(("sanity", "reinit"),)), RunOptions(out=tmp_path))
    plain = execute(tiny_spec("pass", target="flops=0.5"), RunOptions(out=tmp_path / "plain"))
    assert record.status == "ok" and record.mechanism.signal_control == "re-initialised structure"
    assert record.notes["sanity"]["check"] == "reinit"
    assert record.cost.finetune_steps == plain.cost.finetune_steps + record.cost.dense_pretrain_steps
    assert record.structure == plain.structure                                # the same found widths
    assert record.spec["method_args"]["sanity"] == "reinit" and "sanity" not in plain.spec["method_args"]


def test_reinit_from_pretrained_weights_says_its_budget_is_not_the_weights_own(recwarn):
    """From weights trained elsewhere, the scratch run cannot get the steps those weights had: the
    record's sanity note says the budget is not equal, and a warning says so at once."""
    import dataclasses
    from types import SimpleNamespace

    from sparsebench.runners.pipeline import reinitialised

    spec = tiny_spec("pass")
    model = nn.Sequential(nn.Linear(4, 2))
    outcome = SimpleNamespace(model=model, masks=None, notes={})
    data = SimpleNamespace(pretrain_steps=30, finetune_steps=10)
    reinitialised(spec, outcome, data)
    assert "budget" not in outcome.notes["sanity"] and outcome.notes["sanity"]["trained_steps"] == 40
    reinitialised(dataclasses.replace(spec, pretrained="timm/resnet50.a1_in1k"), outcome, data)
    assert outcome.notes["sanity"]["budget"].startswith("not equal: the dense model started from timm/resnet50")
    assert any("sanity=reinit from pretrained weights" in str(w.message) for w in recwarn)
