import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from sparsebench.models import MODELS, create_model, model_family


@pytest.mark.parametrize("name", [n for n in MODELS.names() if n.endswith("_tiny") or n in ("resnet20", "resnet56")])
def test_small_models_run_on_small_images(name):
    model = create_model(name, num_classes=7, img_size=16).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 7)
    assert model_family(name) == ("vit" if isinstance(model, VisionTransformer) else "cnn")


@pytest.mark.parametrize("name, classes, params", [
    ("resnet20", 10, 0.27e6), ("resnet56", 10, 0.85e6), ("resnet18", 1000, 11.69e6), ("resnet50", 1000, 25.56e6),
    ("deit_tiny", 1000, 5.72e6), ("deit_small", 1000, 22.05e6), ("mobilenet_v2", 1000, 3.50e6)])
def test_reference_parameter_counts(name, classes, params):
    model = create_model(name, num_classes=classes, img_size=224 if classes == 1000 else 32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)


def test_width_knobs_narrow_the_model():
    wide = create_model("resnet20", num_classes=10)
    narrow = create_model("resnet20", num_classes=10, width=0.5)
    assert narrow.layer3[0].conv1.out_channels == wide.layer3[0].conv1.out_channels // 2
    vit = create_model("vit_cifar_tiny", img_size=16, embed_dim=32, mlp_ratio=2.0)
    assert vit.embed_dim == 32 and vit.blocks[0].mlp.fc1.out_features == 64


def test_unknown_model_lists_allowed_names():
    with pytest.raises(ValueError, match="unknown model 'resnet7'; allowed: .*resnet20"):
        create_model("resnet7")


@pytest.mark.parametrize("name", MODELS.names())
def test_model_card_names_the_real_input_layer_and_classifier(name):
    from torch import nn

    from sparsebench.models import model_card

    card = model_card(name)
    small = name.endswith("_tiny") or name in ("resnet20", "resnet56", "vgg16_bn", "vit_cifar")
    model = create_model(name, num_classes=7, img_size=32 if small else 224)
    modules = dict(model.named_modules())
    weighted = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert card.first_layer == weighted[0] and modules[card.first_layer].in_channels == 3
    assert isinstance(modules[card.classifier], nn.Linear) and modules[card.classifier].out_features == 7
    assert card.family == model_family(name) and card.recipe is not None
    # published weights come with their normalisation; models trained only here have none
    from sparsebench.models.pretrained import HUB_WEIGHTS

    assert (card.mean is not None) == (name in HUB_WEIGHTS) and (card.std is None) == (card.mean is None)


def test_family_recipes_are_the_quick_suites():
    """A plain `sparsebench run` trains as long and with the same optimiser as the quick suite (PASS and
    OFB entries give their searches more epochs, which their run pages' commands state)."""
    from sparsebench.runners.suite import load_suite

    import dataclasses
    import json

    suite = load_suite("benchmarks/quick.yaml")
    for spec in suite.specs:
        if spec.recipe.search_epochs != model_card_recipe(spec.model).search_epochs:
            assert spec.method in ("pass", "ofb")
            spec = dataclasses.replace(spec, recipe=dataclasses.replace(
                spec.recipe, search_epochs=model_card_recipe(spec.model).search_epochs))
        assert spec.recipe == model_card_recipe(spec.model)
        # equal as JSON too (15, not 15.0): the spec hash of a plain run is the suite's
        assert json.dumps(dataclasses.asdict(spec.recipe)) == json.dumps(dataclasses.asdict(model_card_recipe(spec.model)))


def model_card_recipe(name):
    from sparsebench.models import model_card

    return model_card(name).recipe
