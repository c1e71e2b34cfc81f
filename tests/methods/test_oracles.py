"""The baselines against the libraries and formulas they stand for, on small real models.

- `magnitude-global` / `magnitude-layerwise` against `torch.nn.utils.prune` (the same masks,
  entry for entry);
- ERK against a literal port of RigL's `get_sparsities_erdos_renyi` (google-research/rigl,
  `rigl/sparse_utils.py`), written here and calling none of our code;
- `l1-channel` against torch-pruning's pruner: with an importance matched to ours (the kept sets
  equal, group by group) and with its default `MagnitudeImportance(p=1)` (a documented overlap);
  the compacted model's MACs against fvcore.

Each fails if our selection drifts. FLOPs against fvcore on full-size models:
`tests/measure/test_fvcore_crosscheck.py`.
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from sparsebench.measure.flops import fvcore_macs
from sparsebench.methods import create_method
from sparsebench.methods.baselines import unit_space
from sparsebench.models import create_model, model_card
from sparsebench.training.masks import layer_densities, prunable_weights

from conftest import make_context, randomize_norms


# --- unstructured magnitude vs torch.nn.utils.prune ------------------------------------------------
LAYER_SETS = {"benchmark": {}, "official": {"layers": "official"},
              "all": {"skip_first": False, "skip_last": False}}


def _our_masks(method_name, model_name, sparsity, args):
    method = create_method(method_name, **args)
    ctx = make_context(model_name, f"sparsity={sparsity}", method)
    dense = copy.deepcopy(ctx.model)
    outcome = method.run(ctx)
    return dense, {n[:-len(".weight")]: m for n, m in outcome.masks.masks.items()}


def assert_same_masks(ours, pruned):
    """Our masks entry for entry against the `weight_mask` torch.nn.utils.prune left on `pruned`."""
    modules = dict(pruned.named_modules())
    differing = {n: int((ours[n] != modules[n].weight_mask.bool()).sum()) for n in ours}
    total = sum(m.numel() for m in ours.values())
    assert sum(differing.values()) == 0, (f"{sum(differing.values())} of {total} entries differ from torch's masks: "
                                          f"{ {n: d for n, d in differing.items() if d} }")


@pytest.mark.parametrize("model_name", ["resnet20_tiny", "vit_cifar_tiny"])
@pytest.mark.parametrize("layer_set", sorted(LAYER_SETS))
def test_magnitude_global_equals_torch_global_unstructured(model_name, layer_set):
    dense, ours = _our_masks("magnitude-global", model_name, 0.9, LAYER_SETS[layer_set])
    modules = dict(dense.named_modules())
    prune.global_unstructured([(modules[n], "weight") for n in ours], pruning_method=prune.L1Unstructured,
                              amount=0.9)
    assert_same_masks(ours, dense)
    first, last = model_card(model_name).edge_layers
    assert (first in ours, last in ours) == {"benchmark": (False, False), "official": (False, True),
                                             "all": (True, True)}[layer_set]


@pytest.mark.parametrize("model_name", ["resnet20_tiny", "vit_cifar_tiny"])
def test_magnitude_layerwise_equals_torch_l1_unstructured_per_layer(model_name):
    dense, ours = _our_masks("magnitude-layerwise", model_name, 0.8, {})
    modules = dict(dense.named_modules())
    for n in ours:
        prune.l1_unstructured(modules[n], "weight", amount=0.8)
    assert_same_masks(ours, dense)


@pytest.mark.parametrize("model_name", ["resnet20_tiny", "vit_cifar_tiny"])
def test_magnitude_layerwise_erk_equals_rigl_densities_pruned_by_torch(model_name):
    """The whole chain: RigL's ERK densities (the port below), each layer pruned by torch's L1."""
    dense, ours = _our_masks("magnitude-layerwise", model_name, 0.9,
                             {"distribution": "erk", "layers": "official"})
    modules = dict(dense.named_modules())
    shapes = {n: tuple(m.weight.shape) for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    rigl = rigl_erk_sparsities(shapes, 0.9, {model_card(model_name).first_layer: 0.0}, n_zeros=exact_n_zeros)
    for n in ours:
        prune.l1_unstructured(modules[n], "weight", amount=float(rigl[n]))
    assert_same_masks(ours, dense)


# --- ERK vs RigL's formula ---------------------------------------------------------------------------
def floor_n_zeros(size, sparsity):
    """rigl/sparse_utils.py `get_n_zeros`."""
    return int(np.floor(sparsity * size))


def exact_n_zeros(size, sparsity):
    return sparsity * size


def rigl_erk_sparsities(shapes, default_sparsity, custom_sparsity_map, n_zeros=floor_n_zeros, erk_power_scale=1.0):
    """Port of RigL's `get_sparsities_erdos_renyi` (include_kernel=True), line for line: layers in
    `custom_sparsity_map` are left out of the budget; a layer whose ERK probability exceeds 1 joins
    `dense_layers` (the largest first) and ε is solved again."""
    is_eps_valid = False
    dense_layers = set()
    while not is_eps_valid:
        divisor = 0
        rhs = 0
        raw_probabilities = {}
        for name, shape_list in shapes.items():
            n_param = np.prod(shape_list)
            n_zeros_ = n_zeros(n_param, default_sparsity)
            if name in dense_layers:
                rhs -= n_zeros_
            elif name in custom_sparsity_map:
                pass
            else:
                n_ones = n_param - n_zeros_
                rhs += n_ones
                raw_probabilities[name] = (np.sum(shape_list) / np.prod(shape_list)) ** erk_power_scale
                divisor += raw_probabilities[name] * n_param
        eps = rhs / divisor
        max_prob = np.max(list(raw_probabilities.values()))
        max_prob_one = max_prob * eps
        if max_prob_one > 1:
            is_eps_valid = False
            for mask_name, mask_raw_prob in raw_probabilities.items():
                if mask_raw_prob == max_prob:
                    dense_layers.add(mask_name)
        else:
            is_eps_valid = True
    sparsities = {}
    for name in shapes:
        if name in custom_sparsity_map:
            sparsities[name] = custom_sparsity_map[name]
        elif name in dense_layers:
            sparsities[name] = 0.0
        else:
            sparsities[name] = 1.0 - eps * raw_probabilities[name]
    return sparsities


ERK_CASES = [("resnet20_tiny", 0.9), ("resnet20_tiny", 0.95), ("vit_cifar_tiny", 0.9), ("resnet18_tiny", 0.98)]


@pytest.mark.parametrize("layer_set", ["benchmark", "official"])
@pytest.mark.parametrize("model_name, sparsity", ERK_CASES)
def test_erk_densities_equal_rigl_formula(model_name, sparsity, layer_set):
    model = create_model(model_name, num_classes=10, img_size=16)
    first, last = model_card(model_name).edge_layers
    dense_edges = [first] if layer_set == "official" else [first, last]
    params = prunable_weights(model, exclude=dense_edges)
    ours = layer_densities(params, sparsity, "erk")
    shapes = {n[:-len(".weight")]: tuple(p.shape) for n, p in prunable_weights(model).items()}
    custom = {n: 0.0 for n in dense_edges}
    exact = rigl_erk_sparsities(shapes, sparsity, custom, n_zeros=exact_n_zeros)
    literal = rigl_erk_sparsities(shapes, sparsity, custom)
    names = [n[:-len(".weight")] for n in params]
    assert {n for n in names if 1.0 - exact[n] == 1.0} == {n for n in names if ours[f"{n}.weight"] == 1.0}
    assert max(abs(ours[f"{n}.weight"] - (1.0 - exact[n])) for n in names) < 1e-12
    # RigL floors each layer's zeros in its budget: that raises its right-hand side by less than one
    # weight per layer, so each density by less than density × layers / kept weights
    kept = (1.0 - sparsity) * sum(p.numel() for p in params.values())
    for n in names:
        d = ours[f"{n}.weight"]
        assert 0.0 <= (1.0 - literal[n]) - d <= d * len(shapes) / kept + 1e-12


# --- l1-channel vs torch-pruning -------------------------------------------------------------------------
def _tp():
    tp = pytest.importorskip("torch_pruning")
    return tp


def filter_l1_importance(normalizer=None):
    """torch-pruning's group L1 over the filters that produce a channel only (Li et al.): its
    `GroupMagnitudeImportance` summed over conv/linear output rows, without the next layers' input
    columns and norm scales it adds by default. Depthwise convs are pruned by their own function in
    torch-pruning and never enter a magnitude score."""
    tp = _tp()
    from torch_pruning.pruner import function as F

    class FilterL1(tp.importance.GroupMagnitudeImportance):
        def __init__(self):
            super().__init__(p=1, group_reduction="sum", normalizer=normalizer, target_types=[nn.Conv2d, nn.Linear])

        def __call__(self, group):
            producing = [item for item in group
                         if item.dep.pruning_fn in (F.prune_conv_out_channels, F.prune_linear_out_channels)]
            return super().__call__(producing)

    return FilterL1()


def torch_pruning_kept(model, input_size, space, kept, importance):
    """torch-pruning's pruner at our per-group counts: {group root: kept channel indices}, and the
    model it pruned. The ratio sits half a channel below each count, so its int() lands on it."""
    tp = _tp()
    model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    ratios = {modules[g.root]: (g.size - int(k.sum()) - 0.5) / g.size for g, k in zip(space.groups, kept)}
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.BasePruner(model, torch.zeros(1, *input_size), importance=importance, pruning_ratio=0.0,
                                  pruning_ratio_dict=ratios, ignored_layers=[classifier])
    out = {g.root: set(range(g.size)) for g in space.groups}
    for group in pruner.step(interactive=True):
        out[names[group[0].dep.target.module]] -= {int(i) for i in group[0].idxs}
        group.prune()
    return out, model


def _selection(model_name, img_size, scope, flops=0.4):
    torch.manual_seed(0)
    model = randomize_norms(create_model(model_name, num_classes=10, img_size=img_size)).eval()
    input_size = (3, img_size, img_size)
    method = create_method("l1-channel", scope=scope)
    space = unit_space(model, input_size, method.config.residual_mode)
    kept = method.select_units(space, method.unit_scores(model, space, None), flops)
    return model, input_size, space, kept


CHANNEL_CASES = [("resnet20_tiny", 16), ("resnet18_tiny", 16), ("mobilenet_v2_tiny", 32)]


@pytest.mark.parametrize("scope", ["uniform", "global"])
@pytest.mark.parametrize("model_name, img_size", CHANNEL_CASES)
def test_l1_channel_kept_sets_equal_torch_pruning_with_filter_l1(model_name, img_size, scope):
    model, input_size, space, kept = _selection(model_name, img_size, scope)
    theirs, pruned = torch_pruning_kept(model, input_size, space, kept, filter_l1_importance())
    differing = [g.root for g, k in zip(space.groups, kept)
                 if set(torch.nonzero(k).flatten().tolist()) != theirs[g.root]]
    assert differing == [], f"{len(differing)} of {len(space.groups)} groups keep other channels: {differing}"
    # the closed-form MACs of our counts are those of torch-pruning's pruned model, as fvcore counts them
    assert space.macs([int(k.sum()) for k in kept]) == fvcore_macs(pruned, input_size)


@pytest.mark.parametrize("scope, fill, normalizer", [("uniform", "raw", None), ("uniform", "normalized", "mean"),
                                                     ("global", "raw", "mean")])
@pytest.mark.parametrize("model_name, img_size", CHANNEL_CASES)
def test_l1_channel_ranks_channels_across_groups_by_torch_pruning_scores(model_name, img_size, scope, fill, normalizer):
    """What the global threshold and the greedy fill compare across groups: torch-pruning's filter
    L1, divided by the group's mean where it normalises (its `normalizer="mean"`)."""
    tp = _tp()
    torch.manual_seed(0)
    model = randomize_norms(create_model(model_name, num_classes=10, img_size=img_size)).eval()
    input_size = (3, img_size, img_size)
    method = create_method("l1-channel", scope=scope, fill=fill)
    space = unit_space(model, input_size, method.config.residual_mode)
    ours = dict(zip([g.root for g in space.groups], method.ranking_scores(method.unit_scores(model, space, None))))
    names = {m: n for n, m in model.named_modules()}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *input_size))
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    importance = filter_l1_importance(normalizer)
    compared = 0
    for group in graph.get_all_groups(ignored_layers=[classifier], root_module_types=[nn.Conv2d, nn.Linear]):
        root = names[group[0].dep.target.module]
        torch.testing.assert_close(ours[root], importance(group).float(), rtol=1e-5, atol=0,
                                   msg=lambda m, root=root: f"group {root}: not torch-pruning's ranking scores. {m}")
        compared += 1
    assert compared == len(space.groups)


# torch-pruning's default MagnitudeImportance(p=1) also adds the next layers' input weights and the
# norm scales (mean over the group, normalised): another convention, so the kept sets overlap only
# partly. Measured here (randomised norms, FLOPs 0.4): mean Jaccard per group 0.57-0.75 (docs/conventions.md).
DEFAULT_OVERLAP = (0.45, 0.9)


@pytest.mark.parametrize("scope", ["uniform", "global"])
@pytest.mark.parametrize("model_name, img_size", CHANNEL_CASES)
def test_l1_channel_overlaps_torch_pruning_default_importance_as_documented(model_name, img_size, scope):
    tp = _tp()
    model, input_size, space, kept = _selection(model_name, img_size, scope)
    theirs, _ = torch_pruning_kept(model, input_size, space, kept, tp.importance.GroupMagnitudeImportance(p=1))
    jaccard = []
    for g, k in zip(space.groups, kept):
        ours = set(torch.nonzero(k).flatten().tolist())
        jaccard.append(len(ours & theirs[g.root]) / len(ours | theirs[g.root]))
    mean = sum(jaccard) / len(jaccard)
    assert DEFAULT_OVERLAP[0] <= mean <= DEFAULT_OVERLAP[1], f"mean Jaccard {mean:.3f} outside {DEFAULT_OVERLAP}"
