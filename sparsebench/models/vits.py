"""Vision Transformers as stock timm `VisionTransformer`s (no forked classes).

DeiT-Tiny/Small/Base follow timm's `deit_*_patch16_224` configurations; `vit_cifar` is a
small-image ViT (patch 4) for 32-px data; `_tiny` variants are CPU-sized. `embed_dim`,
`mlp_ratio`, `depth` and `num_heads` may be overridden (the `dense-small` control uses
the first two).
"""
from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from sparsebench.models.registry import IMAGENET_MEAN, IMAGENET_STD, register_model


# name: (description, patch, embed_dim, depth, heads, default classes, default img_size)
VIT_CONFIGS = {
    "deit_tiny": ("DeiT-Tiny (timm, patch 16, D 192, 12 blocks, 3 heads), 1.26 GMACs at 224 px", 16, 192, 12, 3, 1000, 224),
    "deit_small": ("DeiT-Small (timm, patch 16, D 384, 12 blocks, 6 heads), 4.6 GMACs at 224 px", 16, 384, 12, 6, 1000, 224),
    "deit_base": ("DeiT-Base (timm, patch 16, D 768, 12 blocks, 12 heads), 17.6 GMACs at 224 px", 16, 768, 12, 12, 1000, 224),
    "vit_cifar": ("small-image ViT (timm, patch 4, D 192, 6 blocks, 3 heads) for 32-px data", 4, 192, 6, 3, 10, 32),
    "deit_tiny_tiny": ("CPU-tiny DeiT-Tiny layout (patch 4, D 48, 2 blocks, 3 heads)", 4, 48, 2, 3, 10, 32),
    "deit_small_tiny": ("CPU-tiny DeiT-Small layout (patch 4, D 96, 2 blocks, 6 heads)", 4, 96, 2, 6, 10, 32),
    "deit_base_tiny": ("CPU-tiny DeiT-Base layout (patch 4, D 96, 2 blocks, 12 heads)", 4, 96, 2, 12, 10, 32),
    "vit_cifar_tiny": ("CPU-tiny ViT (patch 4, D 64, 4 blocks, 4 heads, MLP 256)", 4, 64, 4, 4, 10, 32),
}


def _vit_factory(patch: int, embed_dim: int, depth: int, heads: int, classes: int, size: int):
    def factory(num_classes=classes, img_size=size, in_chans=3, **overrides):
        cfg = dict(img_size=img_size, patch_size=patch, in_chans=in_chans, num_classes=num_classes,
                   embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=4.0, qkv_bias=True)
        cfg.update(overrides)
        return VisionTransformer(**cfg)

    return factory


# DeiT's published weights (timm deit_*_patch16_224.fb_in1k) expect ImageNet statistics;
# the small-image ViTs are only ever trained here, on their dataset's own statistics.
HUB_NORMALISED = {"deit_tiny", "deit_small"}

for _name, (_description, *_shape) in VIT_CONFIGS.items():
    _norm = (IMAGENET_MEAN, IMAGENET_STD) if _name in HUB_NORMALISED else (None, None)
    register_model(_name, _description, "vit", "patch_embed.proj", "head", *_norm)(_vit_factory(*_shape))
