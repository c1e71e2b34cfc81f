"""Soft width masks at OFB's points: identity at 1, exact export of folded scales (heads ×
head dims, MLP, embedding with alive-aware norms), gradients reach the masks."""
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from sparsebench.models import create_model
from sparsebench.training.vit_slim import BlockStructure, ViTStructure
from sparsebench.training.vit_widths import ViTWidthMasks, slim_vit_scaled

from conftest import set_fused_attention

D, H, HD, HIDDEN = 64, 4, 16, 256


@pytest.fixture
def vit():
    torch.manual_seed(0)
    model = create_model("vit_cifar_tiny", num_classes=10, img_size=16).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            elif p.dim() == 1:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1] if p.dim() == 2 else p[0].numel()))
    return model


def _x():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def test_masks_at_one_are_the_stock_model(vit):
    x = _x()
    with torch.no_grad():
        dense = vit(x)
        with ViTWidthMasks(vit) as masks:
            assert torch.equal(vit(x), dense)
            masks.attn = [torch.ones(H, HD)] * 4
            masks.mlp = [torch.ones(HIDDEN)] * 4
            masks.embed = torch.ones(D)
            masks.set_embed_alive(torch.ones(D, dtype=torch.bool))
            torch.testing.assert_close(vit(x), dense, atol=1e-6, rtol=0)
        assert torch.equal(vit(x), dense)


def _random_case(embed_pruned: bool, seed=3):
    """Scales in (0.5, 1.5) on kept units, 0 elsewhere; kept heads keep equal dims."""
    g = torch.Generator().manual_seed(seed)
    blocks, attn, mlp = [], [], []
    for b, (n_heads, kdim, hidden) in enumerate([(4, 16, 256), (2, 6, 96), (3, 10, 160), (1, 4, 64)]):
        heads = torch.randperm(H, generator=g)[:n_heads].tolist()
        dims = [torch.randperm(HD, generator=g)[:kdim].tolist() for _ in heads]
        neurons = torch.randperm(HIDDEN, generator=g)[:hidden].tolist()
        s = torch.zeros(H, HD)
        for h, cs in zip(heads, dims):
            s[h, cs] = torch.rand(kdim, generator=g) + 0.5
        m = torch.zeros(HIDDEN)
        m[neurons] = torch.rand(hidden, generator=g) + 0.5
        blocks.append(BlockStructure(heads=heads, mlp=neurons, head_dims=dims))
        attn.append(s)
        mlp.append(m)
    embed = None
    if embed_pruned:
        embed = torch.randperm(D, generator=g)[:40].tolist()
    e = torch.zeros(D)
    e[embed if embed is not None else list(range(D))] = torch.rand(40 if embed_pruned else D, generator=g) + 0.5
    return ViTStructure(blocks, embed=embed), attn, mlp, e


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("embed_pruned", [False, True])
def test_export_equals_masked_model(vit, embed_pruned, fused):
    set_fused_attention(vit, fused)
    structure, attn, mlp, embed = _random_case(embed_pruned)
    x = _x()
    with torch.no_grad():
        dense = vit(x)
        slim = slim_vit_scaled(vit, structure, attn, mlp, embed)
        with ViTWidthMasks(vit) as masks:
            masks.attn, masks.mlp, masks.embed = attn, mlp, embed
            masks.set_embed_alive(None if structure.embed is None else embed > 0)
            masked = vit(x)
        out = slim(x)
    assert isinstance(slim, VisionTransformer)
    assert slim.embed_dim == (40 if embed_pruned else D)
    assert [b.attn.num_heads for b in slim.blocks] == [4, 2, 3, 1]
    assert [b.attn.head_dim for b in slim.blocks] == [16, 6, 10, 4]
    assert (masked - dense).abs().max() > 1e-2
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=0)
    assert torch.equal(vit(x), dense)


def test_gradients_reach_every_mask(vit):
    masks = ViTWidthMasks(vit)
    attn = [torch.full((H, HD), 0.7, requires_grad=True) for _ in range(4)]
    mlp = [torch.full((HIDDEN,), 0.7, requires_grad=True) for _ in range(4)]
    embed = torch.full((D,), 0.7, requires_grad=True)
    masks.attn, masks.mlp, masks.embed = attn, mlp, embed
    vit(_x()).square().sum().backward()
    masks.remove()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in [*attn, *mlp, embed])


def test_token_transform_sees_the_masked_embedding(vit):
    seen = {}

    def transform(x, embed_mask):
        seen["x"], seen["m"] = x, embed_mask
        return x

    with ViTWidthMasks(vit) as masks:
        masks.embed = torch.zeros(D).index_fill(0, torch.arange(10), 1.0)
        masks.token_transform = transform
        vit(_x())
    assert seen["x"].shape == (3, 17, D) and seen["x"][..., 10:].abs().max() == 0
    assert torch.equal(seen["m"], masks.embed)
