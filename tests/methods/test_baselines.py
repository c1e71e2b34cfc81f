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


# --- conventions: which scores, how the fill ranks, what the record says -----------------------------
def test_l1_scores_leave_out_depthwise_kernels():
    """MobileNetV2: a channel's 3×3 depthwise kernel carries it but is not one of its filters (Li et
    al.; torch-pruning's magnitude importance leaves it out too): changing it changes no score."""
    from sparsebench.methods.baselines import unit_space

    torch.manual_seed(0)
    from sparsebench.models import create_model

    model = create_model("mobilenet_v2_tiny", num_classes=10, img_size=32).eval()
    method = create_method("l1-channel")
    space = unit_space(model, (3, 32, 32), "coupled")
    depthwise = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    carrying = [g for g in space.groups if set(g.out_members) & set(depthwise)]
    assert carrying, "MobileNetV2 has groups a depthwise conv carries"
    before = method.unit_scores(model, space, None)
    with torch.no_grad():
        for n in depthwise:
            model.get_submodule(n).weight.mul_(100.0)
    after = method.unit_scores(model, space, None)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_normalized_fill_does_not_depend_on_a_groups_score_scale():
    """Uniform scope: the raw fill gives the extra channels to whichever group's scores are largest
    (a coupled group sums several convs); the normalised fill ranks scores over their group's mean."""
    from sparsebench.methods.baselines import unit_space
    from sparsebench.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18_tiny", num_classes=10, img_size=16).eval()
    space = unit_space(model, (3, 16, 16), "coupled")
    kept = {}
    for fill in ("raw", "normalized"):
        method = create_method("l1-channel", fill=fill)
        scores = method.unit_scores(model, space, None)
        lowest = min(range(len(scores)), key=lambda i: float(scores[i].mean()))     # gets no extra channel raw
        scaled = [s * (1000.0 if i == lowest else 1.0) for i, s in enumerate(scores)]
        kept[fill] = [[int(k.sum()) for k in method.select_units(space, s, 0.25)] for s in (scores, scaled)]
    assert kept["normalized"][0] == kept["normalized"][1]
    assert kept["raw"][0] != kept["raw"][1]          # the raw fill follows the scale


@pytest.mark.parametrize("scope, fill, recorded", [("uniform", "raw", "raw"), ("uniform", "normalized", "normalized"),
                                                   ("global", "raw", "normalized")])
def test_l1_channel_records_its_score_and_fill_conventions(scope, fill, recorded):
    method = create_method("l1-channel", scope=scope, fill=fill)
    outcome = method.run(make_context("resnet20_tiny", "flops=0.5", method))
    assert outcome.notes["fill"] == recorded and outcome.notes["scope"] == scope
    assert "depthwise kernels" in outcome.notes["scores"] and "not counted" in outcome.notes["scores"]


COMMITTED = ("l1-channel", "random-channel", "magnitude-global", "magnitude-layerwise", "random", "gmp", "rigl", "set")


def test_committed_records_keep_their_spec_hashes():
    """The committed evidence and quick results name their runs by spec hash: a Config field added
    since (a layer-set preset, a fill) must not change the hash of a run that does not set it."""
    import json
    from pathlib import Path

    from sparsebench.runners.pipeline import resolve
    from sparsebench.specs import RunSpec

    results = Path(__file__).resolve().parents[2] / "results"
    records = [p for d in ("evidence", "quick") for p in sorted((results / d / "records").glob("*.json"))
               if p.name.split("__")[0] in COMMITTED]
    assert len({p.name.split("__")[0] for p in records}) == len(COMMITTED)
    changed = []
    for path in records:
        record = json.loads(path.read_text())
        if resolve(RunSpec.from_dict(record["spec"])).hash != record["spec_hash"]:
            changed.append(path.name)
    assert changed == []
