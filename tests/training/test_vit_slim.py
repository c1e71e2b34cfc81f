"""ViT slimming exporter: masked == slim (S²ViTE fold, OFB head dims, alive-aware embedding),
closed-form MACs and params, JSON reload."""
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from sparsebench.errors import SpecError
from sparsebench.measure.flops import count_macs, count_params
from sparsebench.training.vit_slim import (
    BlockStructure, ConstantAttention, ConstantMlp, ViTStructure, emulate_structure, slim_vit, vit_macs, vit_params,
)
from sparsebench.models import create_model

from conftest import set_fused_attention

INPUT = (3, 16, 16)
D, H, HD, HIDDEN, DEPTH = 64, 4, 16, 256, 4          # vit_cifar_tiny


@pytest.fixture
def vit():
    """vit_cifar_tiny at 16 px with every parameter non-trivial: non-zero qkv biases (the fold
    matters), LayerNorm affines away from 1/0 (the alive-aware norm matters)."""
    torch.manual_seed(0)
    model = create_model("vit_cifar_tiny", num_classes=10, img_size=16).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            elif p.dim() == 1:
                p.copy_(0.5 * noise)                           # biases, incl. qkv
            else:
                p.copy_(noise / math.sqrt(p.shape[-1] if p.dim() == 2 else p[0].numel()))
    return model


def _x(n=3, seed=2):
    return torch.randn(n, *INPUT, generator=torch.Generator().manual_seed(seed))


# Structures exercising each rule: a block with 0 heads, 0 neurons, reduced head dims, pruned embedding.
HEADS_MLP = ViTStructure([
    BlockStructure(heads=[0, 2], mlp=list(range(0, HIDDEN, 3))),
    BlockStructure(heads=[], mlp=list(range(100))),
    BlockStructure(heads=[3, 1, 2], mlp=list(range(50, 90))),
    BlockStructure(heads=[1], mlp=[]),
])
HEAD_DIMS = ViTStructure([
    BlockStructure(heads=[0, 1, 2, 3], mlp=list(range(HIDDEN)), head_dims=[0, 1, 2, 5, 7, 9, 11, 15]),
    BlockStructure(heads=[1, 3], mlp=list(range(0, HIDDEN, 2)), head_dims=[[0, 3, 4, 8], [1, 2, 9, 15]]),
    BlockStructure(heads=[], mlp=list(range(10))),
    BlockStructure(heads=[2], mlp=list(range(64)), head_dims=[list(range(12))]),
])
EMBED = ViTStructure(HEAD_DIMS.blocks, embed=sorted(set(range(0, D, 2)) | {1, 3, 5, 63}))
CASES = {"heads_mlp": HEADS_MLP, "head_dims": HEAD_DIMS, "embed": EMBED}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fold_bias", [True, False])
def test_slim_equals_dense_emulation(vit, case, fused, fold_bias):
    structure = CASES[case]
    set_fused_attention(vit, fused)
    x = _x()
    with torch.no_grad():
        dense = vit(x)
        slim = slim_vit(vit, structure, fold_bias=fold_bias)
        handles = emulate_structure(vit, structure, fold_bias=fold_bias)
        masked = vit(x)
        for h in handles:
            h.remove()
        out = slim(x)
        restored = vit(x)
    assert isinstance(slim, VisionTransformer)
    assert all(m.fused_attn == fused for m in slim.modules() if hasattr(m, "fused_attn"))
    assert (masked - dense).abs().max() > 1e-2, "emulation should change the output"
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=0)
    torch.testing.assert_close(restored, dense, atol=0, rtol=0)


def _weight_masked_copy(model, structure, mask_bias: bool):
    """The pruned model the way the methods hold it: pruned weight rows/columns zeroed
    (S²ViTE keeps qkv biases live; OFB masks them too), independent of the hooks."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for blk, s in zip(ref.blocks, structure.blocks):
            d = blk.attn.head_dim
            keep = torch.zeros(H * d, dtype=torch.bool)
            keep[s.qkv_columns(d)] = True
            blk.attn.qkv.weight.view(3, H * d, D)[:, ~keep] = 0
            if mask_bias:
                blk.attn.qkv.bias.view(3, H * d)[:, ~keep] = 0
            neuron = torch.zeros(HIDDEN, dtype=torch.bool)
            neuron[s.mlp] = True
            blk.mlp.fc1.weight[~neuron] = 0
            blk.mlp.fc2.weight[:, ~neuron] = 0
    return ref


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", ["heads_mlp", "head_dims"])
def test_fold_matches_weight_masked_model(vit, case, fused):
    """S²ViTE: zeroed qkv rows with live biases == slim with the fold; OFB: zeroed rows and
    biases == slim without it. Checks the fold itself, not just hooks vs export."""
    structure = CASES[case]
    set_fused_attention(vit, fused)
    x = _x()
    for fold in (True, False):
        ref = _weight_masked_copy(vit, structure, mask_bias=not fold)
        with torch.no_grad():
            torch.testing.assert_close(slim_vit(vit, structure, fold_bias=fold)(x), ref(x), atol=1e-5, rtol=0)
    without_fold = slim_vit(vit, structure, fold_bias=False)
    with torch.no_grad():
        assert (without_fold(x) - _weight_masked_copy(vit, structure, mask_bias=False)(x)).abs().max() > 1e-3


def test_slim_shapes_and_attributes(vit):
    slim = slim_vit(vit, EMBED)
    e = len(EMBED.embed)
    assert slim.embed_dim == slim.num_features == slim.head_hidden_size == e
    assert slim.patch_embed.proj.weight.shape[0] == e and slim.pos_embed.shape[-1] == e
    assert slim.norm.normalized_shape == (e,) and slim.head.in_features == e
    b1 = slim.blocks[1].attn
    assert b1.num_heads == 2 and b1.head_dim == 4 and b1.qkv.weight.shape == (3 * 8, e)
    assert b1.proj.weight.shape == (e, 8)
    assert isinstance(slim.blocks[2].attn, ConstantAttention)
    assert slim.blocks[3].mlp.fc1.weight.shape == (64, e)
    assert isinstance(slim_vit(vit, HEADS_MLP).blocks[3].mlp, ConstantMlp)
    # the dense model is untouched
    assert vit.embed_dim == D and vit.blocks[1].attn.qkv.weight.shape == (3 * D, D)


def test_state_dict_keys_are_the_dense_keys(vit):
    dense_keys = set(vit.state_dict())
    full = ViTStructure([BlockStructure(heads=[0, 3], mlp=list(range(5)), head_dims=[1, 2, 3])] * DEPTH,
                        embed=list(range(40)))
    assert set(slim_vit(vit, full).state_dict()) == dense_keys
    # a block with no heads keeps only the folded constant, under its own key
    keys = set(slim_vit(vit, HEADS_MLP).state_dict())
    assert keys <= dense_keys
    assert dense_keys - keys == {"blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias", "blocks.1.attn.proj.weight",
                                 "blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc1.bias", "blocks.3.mlp.fc2.weight"}


def _analytic_params(s: ViTStructure) -> int:
    e = D if s.embed is None else len(s.embed)
    total = (3 * 4 * 4 + 1) * e + e + 17 * e + 2 * e + (e * 10 + 10)    # patch, cls, pos, final norm, head
    for b in s.blocks:
        a = len(b.heads) * b.kdim(HD)
        m = len(b.mlp)
        total += 4 * e                                                   # norm1, norm2
        total += (e * 3 * a + 3 * a if a else 0) + (a * e + e)          # qkv, proj (bias kept when empty)
        total += (e * m + m) + (m * e + e)                               # fc1, fc2
    return total


@pytest.mark.parametrize("case", sorted(CASES))
def test_param_count_is_analytic(vit, case):
    s = CASES[case]
    slim = slim_vit(vit, s)
    assert count_params(slim)["params"] == vit_params(vit, s) == _analytic_params(s)
    assert vit_params(vit) == count_params(vit)["params"]


def _random_structure(g: torch.Generator, embed: bool) -> ViTStructure:
    blocks = []
    for _ in range(DEPTH):
        n_heads = int(torch.randint(0, H + 1, (1,), generator=g))
        kdim = int(torch.randint(1, HD + 1, (1,), generator=g))
        heads = torch.randperm(H, generator=g)[:n_heads].tolist()
        dims = [torch.randperm(HD, generator=g)[:kdim].tolist() for _ in heads]
        mlp = torch.randperm(HIDDEN, generator=g)[:int(torch.randint(0, HIDDEN + 1, (1,), generator=g))].tolist()
        blocks.append(BlockStructure(heads=heads, mlp=mlp, head_dims=dims))
    keep = torch.randperm(D, generator=g)[:int(torch.randint(8, D + 1, (1,), generator=g))].tolist() if embed else None
    return ViTStructure(blocks, embed=keep)


def test_closed_form_macs_equal_counter(vit):
    set_fused_attention(vit, True)       # the counter switches it off; the closed form counts the matmuls
    assert vit_macs(vit) == count_macs(vit, INPUT).macs
    g = torch.Generator().manual_seed(5)
    for i in range(6):
        s = _random_structure(g, embed=i % 2 == 1)
        slim = slim_vit(vit, s)
        assert vit_macs(vit, s, INPUT) == count_macs(slim, INPUT).macs
        x = _x(2)
        with torch.no_grad():
            handles = emulate_structure(vit, s)
            masked = vit(x)
            for h in handles:
                h.remove()
            torch.testing.assert_close(slim(x), masked, atol=1e-5, rtol=0)


def test_deit_tiny_dense_macs_reference():
    """Spec §1 reference: DeiT-Tiny at 224 px counts 1.254 GMACs (fused attention off)."""
    model = create_model("deit_tiny", num_classes=1000, img_size=224)
    assert abs(vit_macs(model) / 1e9 - 1.254) < 0.01 * 1.254
    # DeiT-S `_60`-like slimming at DeiT-T scale stays consistent with the counter
    s = ViTStructure([BlockStructure(heads=[0, 2], mlp=list(range(460)))] * 12)
    assert vit_macs(model, s) == count_macs(slim_vit(model, s), (3, 224, 224)).macs


def test_json_round_trip_and_reload(vit, tmp_path):
    s = EMBED
    text = s.to_json()
    loaded = ViTStructure.from_json(text)
    assert loaded == s and loaded.to_json() == text
    slim = slim_vit(vit, s)
    with torch.no_grad():
        slim.blocks[0].attn.proj.bias.add_(0.1)           # "fine-tuned" weights, not re-derivable
    path = tmp_path / "slim.pt"
    torch.save(slim.state_dict(), path)
    (tmp_path / "structure.json").write_text(text)
    torch.manual_seed(123)
    fresh = create_model("vit_cifar_tiny", num_classes=10, img_size=16).eval()
    rebuilt = slim_vit(fresh, ViTStructure.from_json((tmp_path / "structure.json").read_text()))
    rebuilt.load_state_dict(torch.load(path))
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), slim(x), atol=0, rtol=0)


def test_structure_normalises_and_validates(vit):
    b = BlockStructure(heads=[2, 0], mlp=[5, 1], head_dims=[[3, 1], [0, 2]])
    assert b.heads == [0, 2] and b.head_dims == [[0, 2], [1, 3]] and b.mlp == [1, 5]
    assert BlockStructure(heads=[1, 0], mlp=[], head_dims=[4, 2]).head_dims == [[2, 4], [2, 4]]
    with pytest.raises(SpecError):
        BlockStructure(heads=[0, 1], mlp=[], head_dims=[[0, 1], [0]])
    with pytest.raises(SpecError):
        BlockStructure(heads=[0, 0], mlp=[])
    bad = ViTStructure([BlockStructure(heads=[H], mlp=[0])] + HEADS_MLP.blocks[1:])
    with pytest.raises(SpecError):
        slim_vit(vit, bad)
    with pytest.raises(SpecError):
        slim_vit(vit, ViTStructure(HEADS_MLP.blocks[:2]))
    assert EMBED.summary() == {"heads": [4, 2, 0, 1], "head_dim": [8, 4, 0, 12], "mlp": [256, 128, 10, 64],
                               "embed_dim": len(EMBED.embed)}


def test_hooks_on_the_dense_model_do_not_reach_the_slim_model(vit):
    x = _x()
    clean = slim_vit(vit, HEAD_DIMS)
    handles = emulate_structure(vit, EMBED)
    hooked = slim_vit(vit, HEAD_DIMS)
    for h in handles:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(hooked(x), clean(x), atol=0, rtol=0)


def test_slim_model_trains(vit):
    slim = slim_vit(vit, EMBED).train()
    slim(_x(2)).sum().backward()
    assert slim.blocks[2].attn.proj.bias.grad is not None          # the folded constant learns
    # block 2 keeps no head: its norm1 feeds nothing (kept for the state-dict keys)
    assert [n for n, p in slim.named_parameters() if p.grad is None] == ["blocks.2.norm1.weight", "blocks.2.norm1.bias"]


@pytest.mark.parametrize("variant", [
    dict(init_values=0.1, reg_tokens=1),                 # LayerScale, a register token
    dict(class_token=False, global_pool="avg"),          # avg pool through fc_norm
    dict(pre_norm=True, no_embed_class=True),            # LayerNorm norm_pre, bias-free patch embed
])
def test_timm_variants(variant):
    torch.manual_seed(0)
    model = create_model("vit_cifar_tiny", num_classes=10, img_size=16, **variant).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "gamma")) else 0.0
            scale = 0.5 if p.dim() == 1 or p.shape[0] == 1 else 1 / math.sqrt(p[0].numel())
            p.copy_(base + scale * torch.randn(p.shape, generator=g))
    x = _x()
    with torch.no_grad():
        slim = slim_vit(model, EMBED)
        handles = emulate_structure(model, EMBED)
        masked = model(x)
        for h in handles:
            h.remove()
        torch.testing.assert_close(slim(x), masked, atol=1e-5, rtol=0)
    assert count_macs(slim, INPUT).macs == vit_macs(model, EMBED)
    assert count_params(slim)["params"] == vit_params(model, EMBED)
