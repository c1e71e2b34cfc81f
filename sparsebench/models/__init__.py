"""Model registry: CIFAR-style CNNs, torchvision CNNs and timm ViTs, each with a tiny CPU variant.

`create_model(name, num_classes=..., img_size=...)` is the one way in. Every constructor
takes `num_classes`, `img_size` and `in_chans`, plus family-specific width knobs used by
the `dense-small` control. Each registration writes a `ModelCard` (`model_card(name)`):
family, input-layer and classifier names, input normalisation, default recipe.
"""
from sparsebench.models.registry import (
    CARDS, FAMILY_RECIPES, MODELS, ModelCard, create_model, model_card, model_family, register_model,
)
from sparsebench.models import cifar, torchvision_cnns, vits  # noqa: F401  (register models)

__all__ = ["CARDS", "FAMILY_RECIPES", "MODELS", "ModelCard", "create_model", "model_card", "model_family",
           "register_model"]
