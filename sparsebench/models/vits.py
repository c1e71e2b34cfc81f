"""Vision Transformers as stock timm `VisionTransformer`s (no forked classes).

DeiT-Tiny/Small follow timm's `deit_*_patch16_224` configurations; `vit_cifar` is a
small-image ViT (patch 4) for 32-px data; `_tiny` variants are CPU-sized. `embed_dim`,
`mlp_ratio`, `depth` and `num_heads` may be overridden (the `dense-small` control uses
the first two).
"""
from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from sparsebench.models.registry import register_model


def _vit(img_size, num_classes, in_chans, patch_size, embed_dim, depth, num_heads, mlp_ratio=4.0, **overrides):
    cfg = dict(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
    )
    cfg.update(overrides)
    return VisionTransformer(**cfg)


@register_model("deit_tiny", "DeiT-Tiny (timm, patch 16, D 192, 12 blocks, 3 heads), 1.26 GMACs at 224 px", "vit")
def deit_tiny(num_classes=1000, img_size=224, in_chans=3, **overrides):
    return _vit(img_size, num_classes, in_chans, overrides.pop("patch_size", 16), overrides.pop("embed_dim", 192),
                overrides.pop("depth", 12), overrides.pop("num_heads", 3), **overrides)


@register_model("deit_small", "DeiT-Small (timm, patch 16, D 384, 12 blocks, 6 heads), 4.6 GMACs at 224 px", "vit")
def deit_small(num_classes=1000, img_size=224, in_chans=3, **overrides):
    return _vit(img_size, num_classes, in_chans, overrides.pop("patch_size", 16), overrides.pop("embed_dim", 384),
                overrides.pop("depth", 12), overrides.pop("num_heads", 6), **overrides)


@register_model("vit_cifar", "small-image ViT (timm, patch 4, D 192, 6 blocks, 3 heads) for 32-px data", "vit")
def vit_cifar(num_classes=10, img_size=32, in_chans=3, **overrides):
    return _vit(img_size, num_classes, in_chans, overrides.pop("patch_size", 4), overrides.pop("embed_dim", 192),
                overrides.pop("depth", 6), overrides.pop("num_heads", 3), **overrides)


@register_model("deit_tiny_tiny", "CPU-tiny DeiT-Tiny layout (patch 4, D 48, 2 blocks, 3 heads)", "vit")
def deit_tiny_tiny(num_classes=10, img_size=32, in_chans=3, **overrides):
    return _vit(img_size, num_classes, in_chans, overrides.pop("patch_size", 4), overrides.pop("embed_dim", 48),
                overrides.pop("depth", 2), overrides.pop("num_heads", 3), **overrides)


@register_model("deit_small_tiny", "CPU-tiny DeiT-Small layout (patch 4, D 96, 2 blocks, 6 heads)", "vit")
def deit_small_tiny(num_classes=10, img_size=32, in_chans=3, **overrides):
    return _vit(img_size, num_classes, in_chans, overrides.pop("patch_size", 4), overrides.pop("embed_dim", 96),
                overrides.pop("depth", 2), overrides.pop("num_heads", 6), **overrides)


@register_model("vit_cifar_tiny", "CPU-tiny ViT (patch 4, D 64, 4 blocks, 4 heads, MLP 256)", "vit")
def vit_cifar_tiny(num_classes=10, img_size=32, in_chans=3, **overrides):
    return _vit(img_size, num_classes, in_chans, overrides.pop("patch_size", 4), overrides.pop("embed_dim", 64),
                overrides.pop("depth", 4), overrides.pop("num_heads", 4), **overrides)
