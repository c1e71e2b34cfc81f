"""torchvision CNNs (ResNet-18/50, MobileNetV2) and their CPU-tiny variants.

The full models are torchvision's own classes at their standard widths; pretrained
weights are loaded by the harness, never here. Tiny variants use the same classes with
one block per stage (ResNets) or width 0.25 (MobileNetV2).
"""
from __future__ import annotations

from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck

from sparsebench.models.registry import IMAGENET_MEAN, IMAGENET_STD, register_model


def _resnet(block, layers, num_classes, in_chans, width: float = 1.0, **kwargs):
    if width != 1.0:
        return _narrow_resnet(block, layers, num_classes, in_chans, width, **kwargs)
    model = tvm.ResNet(block, layers, num_classes=num_classes, **kwargs)
    if in_chans != 3:
        model.conv1 = tvm.resnet.nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
    return model


def _narrow_resnet(block, layers, num_classes, in_chans, width: float, **kwargs):
    """torchvision's ResNet with every stage's width (64, 128, 256, 512) scaled by `width`: the
    same class, module names and structure, fewer channels (the smoke check's CPU-tiny size)."""
    from torch import nn

    if not 0 < width <= 1:
        raise ValueError(f"width={width} must be in (0, 1]")
    planes = [max(4, int(round(c * width))) for c in (64, 128, 256, 512)]
    model = tvm.ResNet(block, [1, 1, 1, 1], num_classes=num_classes, **kwargs)
    model.inplanes = planes[0]
    model.conv1 = nn.Conv2d(in_chans, planes[0], 7, 2, 3, bias=False)
    model.bn1 = model._norm_layer(planes[0])
    for i, (count, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
        setattr(model, f"layer{i + 1}", model._make_layer(block, planes[i], count, stride=stride))
    model.fc = nn.Linear(planes[3] * block.expansion, num_classes)
    for m in model.modules():        # torchvision's initialisation, for the rebuilt layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return model


@register_model("resnet18", "torchvision ResNet-18, 11.7M params, 1.82 GMACs at 224 px", "cnn", "conv1", "fc", IMAGENET_MEAN, IMAGENET_STD)
def resnet18(num_classes=1000, img_size=224, in_chans=3):
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, in_chans)


@register_model("resnet50", "torchvision ResNet-50, 25.6M params, 4.09 GMACs at 224 px", "cnn", "conv1", "fc", IMAGENET_MEAN, IMAGENET_STD)
def resnet50(num_classes=1000, img_size=224, in_chans=3):
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, in_chans)


@register_model("resnet18_tiny", "CPU-tiny torchvision ResNet (BasicBlock x [1,1,1,1])", "cnn", "conv1", "fc")
def resnet18_tiny(num_classes=10, img_size=32, in_chans=3, width: float = 1.0):
    return _resnet(BasicBlock, [1, 1, 1, 1], num_classes, in_chans, width)


@register_model("resnet50_tiny", "CPU-tiny torchvision ResNet (Bottleneck x [1,1,1,1], width/group 16)", "cnn", "conv1", "fc")
def resnet50_tiny(num_classes=10, img_size=32, in_chans=3, width: float = 1.0):
    return _resnet(Bottleneck, [1, 1, 1, 1], num_classes, in_chans, width, width_per_group=16)


@register_model("mobilenet_v2", "torchvision MobileNetV2 (width 1.0), 3.5M params, 0.30 GMACs at 224 px", "cnn", "features.0.0", "classifier.1", IMAGENET_MEAN, IMAGENET_STD)
def mobilenet_v2(num_classes=1000, img_size=224, in_chans=3, width: float = 1.0):
    return tvm.mobilenet_v2(num_classes=num_classes, width_mult=width)


@register_model("mobilenet_v2_tiny", "CPU-tiny torchvision MobileNetV2 (width 0.25)", "cnn", "features.0.0", "classifier.1")
def mobilenet_v2_tiny(num_classes=10, img_size=32, in_chans=3, width: float = 1.0):
    return tvm.mobilenet_v2(num_classes=num_classes, width_mult=0.25 * width)
