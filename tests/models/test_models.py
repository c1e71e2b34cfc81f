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
