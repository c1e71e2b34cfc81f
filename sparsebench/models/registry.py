"""The model registry and the model card every registered model carries.

A card states what the harness and the methods need to know about a model without
building it: its family (which fixes the default recipe), the module names of its input
layer and classifier (the layers common practice leaves dense), and the input
normalisation its published weights expect.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from torch import nn

from sparsebench.registry import Registry
from sparsebench.specs import Recipe

MODELS = Registry("model")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The default recipe of each family: what `sparsebench run` and every suite start from
# (suite `recipe`/`recipes` and `--recipe` override single values). They are the quick
# suite's recipes, which train both CPU-tiny models to a useful dense checkpoint on digits;
# the ViT needs AdamW, a longer warm-up and more epochs than the CNN.
# Epoch counts are written as the suite files write them (15, not 15.0): the spec hash sees the
# JSON number, so `sparsebench run` with these defaults names the same run as the quick suite.
FAMILY_RECIPES: Dict[str, Recipe] = {
    "cnn": Recipe(pretrain_epochs=15, finetune_epochs=3, search_epochs=1),
    "vit": Recipe(optimizer="adamw", lr=2e-3, finetune_lr=5e-4, weight_decay=0.05, warmup_fraction=0.1,
                  pretrain_epochs=30, finetune_epochs=3, search_epochs=1),
}


@dataclass(frozen=True)
class ModelCard:
    name: str
    family: str                        # cnn | vit
    first_layer: str                   # module name of the input layer (stem conv, patch embedding)
    classifier: str                    # module name of the classifier
    # Normalisation the model's published weights expect; None for models only trained
    # here from scratch, which see their dataset's own statistics.
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None

    @property
    def recipe(self) -> Recipe:
        return FAMILY_RECIPES[self.family]

    @property
    def edge_layers(self) -> Tuple[str, str]:
        """(input layer, classifier): left dense by default by unstructured methods (as GaP and ShrinkBench)."""
        return self.first_layer, self.classifier

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


CARDS: Dict[str, ModelCard] = {}


def register_model(name: str, description: str, family: str, first_layer: str, classifier: str,
                   mean: Optional[Tuple[float, float, float]] = None,
                   std: Optional[Tuple[float, float, float]] = None):
    if family not in FAMILY_RECIPES:
        raise ValueError(f"family must be one of {', '.join(FAMILY_RECIPES)}, got {family!r}")
    CARDS[name] = ModelCard(name, family, first_layer, classifier, mean, std)
    return MODELS.register(name, description, tags=(family,))


def model_card(name: str) -> ModelCard:
    MODELS.get(name)          # an unknown name fails here, listing the allowed names
    return CARDS[name]


def model_family(name: str) -> str:
    return model_card(name).family


def create_model(name: str, num_classes: int = 10, img_size: int = 32, in_chans: int = 3, **kwargs) -> nn.Module:
    model = MODELS.get(name).factory(num_classes=num_classes, img_size=img_size, in_chans=in_chans, **kwargs)
    model.sparsebench_name = name
    return model
