"""Model registry: CIFAR-style CNNs, torchvision CNNs and timm ViTs, each with a tiny CPU variant.

`create_model(name, num_classes=..., img_size=...)` is the one way in. Every constructor
takes `num_classes`, `img_size` and `in_chans`, plus family-specific width knobs used by
the `dense-small` control. Registration tags say the family (`cnn` or `vit`), which
methods and default recipes read.
"""
from sparsebench.models.registry import MODELS, create_model, model_family, register_model
from sparsebench.models import cifar, torchvision_cnns, vits  # noqa: F401  (register models)

__all__ = ["MODELS", "create_model", "model_family", "register_model"]
