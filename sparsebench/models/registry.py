from __future__ import annotations

from torch import nn

from sparsebench.registry import Registry

MODELS = Registry("model")


def register_model(name: str, description: str, family: str):
    if family not in ("cnn", "vit"):
        raise ValueError(f"family must be 'cnn' or 'vit', got {family!r}")
    return MODELS.register(name, description, tags=(family,))


def model_family(name: str) -> str:
    return MODELS.get(name).tags[0]


def create_model(name: str, num_classes: int = 10, img_size: int = 32, in_chans: int = 3, **kwargs) -> nn.Module:
    model = MODELS.get(name).factory(num_classes=num_classes, img_size=img_size, in_chans=in_chans, **kwargs)
    model.sparsebench_name = name
    return model
