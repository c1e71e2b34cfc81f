import pytest
import torch

from sparsebench.measure.flops import count_macs
from sparsebench.methods import create_method
from sparsebench.training.masks import prunable_weights

from conftest import make_context

UNSTRUCTURED = [("random", {}), ("random", {"distribution": "erk"}), ("magnitude-global", {}),
                ("magnitude-layerwise", {}), ("magnitude-layerwise", {"distribution": "erk"})]


def prunable_sparsity(model, names):
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in names)
    return 1 - sum(int((params[n] != 0).sum()) for n in names) / total


@pytest.mark.parametrize("model_name", ["resnet20_tiny", "vit_cifar_tiny"])
@pytest.mark.parametrize("name, args", UNSTRUCTURED)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_unstructured_baselines_meet_target(model_name, name, args, sparsity):
    method = create_method(name, **args)
    ctx = make_context(model_name, f"sparsity={sparsity}", method)
    outcome = method.run(ctx)
    assert outcome.realization == "masked"
    achieved = prunable_sparsity(outcome.model, outcome.prunable)
    assert abs(achieved - sparsity) < 0.01
    assert abs(outcome.masks.sparsity() - sparsity) < 0.01


def test_magnitude_prunes_the_smallest_weights():
    method = create_method("magnitude-global")
    ctx = make_context("resnet20_tiny", "sparsity=0.7", method)
    before = {n: p.detach().clone() for n, p in prunable_weights(ctx.model).items()}
    outcome = method.run(ctx)
    kept = torch.cat([before[n][m].abs() for n, m in outcome.masks.masks.items()])
    pruned = torch.cat([before[n][~m].abs() for n, m in outcome.masks.masks.items()])
    assert kept.min() >= pruned.max()


@pytest.mark.parametrize("model_name", ["resnet20_tiny", "vit_cifar_tiny"])
@pytest.mark.parametrize("name, scope", [("l1-channel", "uniform"), ("l1-channel", "global"),
                                         ("random-channel", "uniform")])
@pytest.mark.parametrize("flops", [0.5, 0.25])
def test_structured_baselines_meet_flops_target_and_compact(model_name, name, scope, flops):
    method = create_method(name, scope=scope)
    ctx = make_context(model_name, f"flops={flops}", method)
    dense_macs = count_macs(ctx.model, ctx.input_size).macs
    outcome = method.run(ctx)
    achieved = count_macs(outcome.model, ctx.input_size).macs / dense_macs
    assert outcome.realization == "compacted"
    assert flops - 0.01 <= achieved <= flops
    assert sum(p.numel() for p in outcome.model.parameters()) < sum(p.numel() for p in ctx.model.parameters())


def test_l1_channel_keeps_the_largest_l1_filters():
    method = create_method("l1-channel", residual_mode="internal")
    ctx = make_context("resnet20_tiny", "flops=0.5", method)
    conv = ctx.model.layer3[0].conv1
    norms = conv.weight.detach().abs().flatten(1).sum(1)
    outcome = method.run(ctx)
    kept = outcome.model.layer3[0].conv1.weight.detach().abs().flatten(1).sum(1)
    # compaction keeps the kept filters in order: they must be the top-k by L1 norm
    assert torch.allclose(kept.sort().values, norms.topk(len(kept)).values.sort().values)


@pytest.mark.parametrize("model_name", ["resnet20_tiny", "vit_cifar_tiny"])
@pytest.mark.parametrize("flops", [0.5, 0.25])
def test_dense_small_matches_flops_and_trains_within_budget(model_name, flops):
    method = create_method("dense-small")
    ctx = make_context(model_name, f"flops={flops}", method, budget=3)
    outcome = method.run(ctx)
    achieved = count_macs(outcome.model, ctx.input_size).macs / ctx.dense_macs
    assert flops - 0.01 <= achieved <= flops
    assert ctx.budget.used == 3
    assert all(torch.isfinite(p).all() for p in outcome.model.parameters())


def test_l1_on_vits_keeps_the_largest_l1_heads():
    from sparsebench.training.vit_units import head_l1_scores

    method = create_method("l1-channel")
    ctx = make_context("vit_cifar_tiny", "flops=0.5", method)
    scores = head_l1_scores(ctx.model)
    outcome = method.run(ctx)
    for block, heads in zip(outcome.structure["blocks"], scores):
        kept = block["heads"]
        assert sorted(kept) == sorted(heads.topk(len(kept)).indices.tolist())


@pytest.mark.parametrize("model_name", ["resnet20_tiny", "vit_cifar_tiny"])
@pytest.mark.parametrize("name", ["random", "magnitude-global", "magnitude-layerwise", "gmp"])
def test_unstructured_methods_leave_input_layer_and_classifier_dense_by_default(model_name, name):
    from sparsebench.models import model_card

    card = model_card(model_name)
    edge = {f"{card.first_layer}.weight", f"{card.classifier}.weight"}
    default = create_method(name)
    ctx = make_context(model_name, "sparsity=0.9", default, budget=2)
    outcome = default.run(ctx)
    assert edge.isdisjoint(outcome.prunable) and edge.isdisjoint(outcome.masks.masks)
    params = dict(outcome.model.named_parameters())
    assert all(bool((params[n] != 0).all()) for n in edge)
    switched = create_method(name, skip_first=False, skip_last=False)
    outcome = switched.run(make_context(model_name, "sparsity=0.9", switched, budget=2))
    assert edge <= set(outcome.prunable)
