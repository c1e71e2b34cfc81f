"""ViTUnitSpace: heads and MLP neurons as units; masked == compacted, exact MACs, selection."""
import json
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from sparsebench.errors import SpecError
from sparsebench.measure.flops import count_macs, count_params
from sparsebench.training.vit_slim import ViTStructure
from sparsebench.training.vit_units import ViTUnitSpace, head_l1_scores, mlp_l1_scores
from sparsebench.models import create_model

from conftest import set_fused_attention

INPUT = (3, 16, 16)


@pytest.fixture
def vit():
    torch.manual_seed(0)
    model = create_model("vit_cifar_tiny", num_classes=10, img_size=16).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            # non-zero biases everywhere (qkv included), so the fold is exercised
            p.copy_(0.5 * noise if p.dim() == 1 else noise / math.sqrt(p[0].numel()))
    return model


def _random_masks(space, g, min_units=0):
    masks = []
    for grp in space.groups:
        k = int(torch.randint(min_units, grp.size + 1, (1,), generator=g))
        m = torch.zeros(grp.size, dtype=torch.bool)
        m[torch.randperm(grp.size, generator=g)[:k]] = True
        masks.append(m)
    return masks


def test_groups_layout(vit):
    space = ViTUnitSpace(vit)
    assert space.input_size == INPUT and space.num_tokens == 17
    assert [(g.block, g.kind, g.size) for g in space.groups[:2]] == [(0, "heads", 4), (0, "mlp", 256)]
    assert len(space.groups) == 8 and space.floor_name == "min_units"
    assert "4 blocks" in space.describe()


@pytest.mark.parametrize("fused", [True, False])
def test_masked_equals_compacted(vit, fused):
    set_fused_attention(vit, fused)
    space = ViTUnitSpace(vit)
    masks = _random_masks(space, torch.Generator().manual_seed(3), min_units=1)
    masks[2] = torch.zeros(4, dtype=torch.bool)            # block 1 keeps no head
    masks[4] = torch.tensor([False, True, False, False])   # block 2 keeps one
    x = torch.randn(3, *INPUT, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = vit(x)
        handles = space.apply_masks(vit, masks)
        masked = vit(x)
        for h in handles:
            h.remove()
        compact = space.compact(vit, masks)
        out = compact(x)
        assert torch.equal(vit(x), dense)                  # handles restore the dense model
    assert isinstance(compact, VisionTransformer)
    assert (masked - dense).abs().max() > 1e-2
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=0)


def test_masking_weights_like_s2vite_matches_the_hooks(vit):
    """The hook emulation equals S²ViTE's own masked model: pruned heads' qkv rows and
    pruned neurons' fc1 rows / fc2 columns zeroed, biases left live."""
    import copy

    space = ViTUnitSpace(vit)
    masks = _random_masks(space, torch.Generator().manual_seed(8), min_units=0)
    ref = copy.deepcopy(vit)
    with torch.no_grad():
        for blk, heads, neurons in zip(ref.blocks, masks[0::2], masks[1::2]):
            blk.attn.qkv.weight.view(3, 4, 16, 64)[:, ~heads] = 0
            blk.mlp.fc1.weight[~neurons] = 0
            blk.mlp.fc2.weight[:, ~neurons] = 0
        x = torch.randn(2, *INPUT)
        handles = space.apply_masks(vit, masks)
        masked = vit(x)
        for h in handles:
            h.remove()
        torch.testing.assert_close(masked, ref(x), atol=1e-5, rtol=0)


def test_closed_form_macs_equal_counter(vit):
    space = ViTUnitSpace(vit)
    assert space.dense_macs == count_macs(vit, INPUT).macs
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        masks = _random_masks(space, g)
        keep = [int(m.sum()) for m in masks]
        assert space.macs(keep) == count_macs(space.compact(vit, masks), INPUT).macs


def test_compacted_param_count_is_analytic(vit):
    space = ViTUnitSpace(vit)
    masks = _random_masks(space, torch.Generator().manual_seed(7), min_units=1)
    D = 64
    expected = (48 + 1) * D + D + 17 * D + 2 * D + (D * 10 + 10)         # patch, cls, pos, norm, head
    for heads, neurons in zip(masks[0::2], masks[1::2]):
        a, m = 16 * int(heads.sum()), int(neurons.sum())
        expected += 4 * D + (3 * a * D + 3 * a) + (a * D + D) + (m * D + m) + (m * D + D)
    assert count_params(space.compact(vit, masks))["params"] == expected


@pytest.mark.parametrize("scope", ["uniform", "global"])
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.25])
def test_select_meets_flops_target_tiny(vit, ratio, scope):
    space = ViTUnitSpace(vit)
    kept = space.select(space.l1_scores(vit), ratio, scope=scope, min_units=1)
    achieved = space.macs([int(m.sum()) for m in kept]) / space.dense_macs
    assert ratio - 0.01 <= achieved <= ratio
    assert all(int(m.sum()) >= 1 for m in kept)
    assert count_macs(space.compact(vit, kept), INPUT).macs / space.dense_macs == pytest.approx(achieved, abs=1e-12)


@pytest.fixture(scope="module")
def deit_tiny_224():
    torch.manual_seed(0)
    return create_model("deit_tiny", num_classes=1000, img_size=224)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.25])
def test_select_meets_flops_target_deit_tiny_224(deit_tiny_224, ratio):
    space = ViTUnitSpace(deit_tiny_224)
    assert space.num_tokens == 197
    assert space.dense_macs / 1e9 == pytest.approx(1.254, rel=0.01)   # spec §1 reference value
    kept = space.select(space.l1_scores(deit_tiny_224), ratio, scope="uniform")
    keep = [int(m.sum()) for m in kept]
    assert ratio - 0.01 <= space.macs(keep) / space.dense_macs <= ratio
    if ratio == 0.5:        # one counter pass at 224 px (construction only, no forward loops)
        assert space.macs(keep) == count_macs(space.compact(deit_tiny_224, kept), (3, 224, 224)).macs


def test_select_below_floor_is_an_error(vit):
    space = ViTUnitSpace(vit)
    floor = space.macs([1] * len(space.groups)) / space.dense_macs
    with pytest.raises(SpecError, match="min_units"):
        space.select(space.l1_scores(vit), floor / 2, min_units=1)


@torch.no_grad()
def test_l1_scores(vit):
    heads, mlp = head_l1_scores(vit), mlp_l1_scores(vit)
    attn, fc = vit.blocks[1].attn, vit.blocks[1].mlp
    h, d, D = 2, 16, 64
    rows = [s * D + h * d + c for s in range(3) for c in range(d)]
    expected = attn.qkv.weight[rows].abs().sum() + attn.proj.weight[:, h * d:(h + 1) * d].abs().sum()
    assert heads[1].shape == (4,) and float(heads[1][h]) == pytest.approx(float(expected), rel=1e-6)
    j = 37
    expected = fc.fc1.weight[j].abs().sum() + fc.fc2.weight[:, j].abs().sum()
    assert mlp[1].shape == (256,) and float(mlp[1][j]) == pytest.approx(float(expected), rel=1e-6)
    space = ViTUnitSpace(vit)
    ordered = space.l1_scores(vit)
    assert torch.equal(ordered[2], heads[1]) and torch.equal(ordered[3], mlp[1])


def test_structure_json_and_inverse(vit):
    space = ViTUnitSpace(vit)
    masks = _random_masks(space, torch.Generator().manual_seed(9))
    record = json.loads(json.dumps(space.structure(masks)))
    assert record["summary"]["heads"] == [int(m.sum()) for m in masks[0::2]]
    structure = ViTStructure.from_dict(record)
    assert structure == space.to_structure(masks)
    assert all(torch.equal(a, b) for a, b in zip(space.masks_of(structure), masks))
