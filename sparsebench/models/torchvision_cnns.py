"""torchvision CNNs (ResNet-18/50, MobileNetV2) and their CPU-tiny variants.

The full models are torchvision's own classes at their standard widths; pretrained
weights are loaded by the harness, never here. Tiny variants use the same classes with
one block per stage (ResNets) or width 0.25 (MobileNetV2).
"""
from __future__ import annotations

from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck

from sparsebench.models.registry import IMAGENET_MEAN, IMAGENET_STD, register_model


def _resnet(block, layers, num_classes, in_chans, **kwargs):
    model = tvm.ResNet(block, layers, num_classes=num_classes, **kwargs)
    if in_chans != 3:
        model.conv1 = tvm.resnet.nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
    return model


@register_model("resnet18", "torchvision ResNet-18, 11.7M params, 1.82 GMACs at 224 px", "cnn", "conv1", "fc", IMAGENET_MEAN, IMAGENET_STD)
def resnet18(num_classes=1000, img_size=224, in_chans=3):
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, in_chans)


@register_model("resnet50", "torchvision ResNet-50, 25.6M params, 4.09 GMACs at 224 px", "cnn", "conv1", "fc", IMAGENET_MEAN, IMAGENET_STD)
def resnet50(num_classes=1000, img_size=224, in_chans=3):
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, in_chans)


@register_model("resnet18_tiny", "CPU-tiny torchvision ResNet (BasicBlock x [1,1,1,1])", "cnn", "conv1", "fc")
def resnet18_tiny(num_classes=10, img_size=32, in_chans=3):
    return _resnet(BasicBlock, [1, 1, 1, 1], num_classes, in_chans)


@register_model("resnet50_tiny", "CPU-tiny torchvision ResNet (Bottleneck x [1,1,1,1], width/group 16)", "cnn", "conv1", "fc")
def resnet50_tiny(num_classes=10, img_size=32, in_chans=3):
    return _resnet(Bottleneck, [1, 1, 1, 1], num_classes, in_chans, width_per_group=16)


@register_model("mobilenet_v2", "torchvision MobileNetV2 (width 1.0), 3.5M params, 0.30 GMACs at 224 px", "cnn", "features.0.0", "classifier.1", IMAGENET_MEAN, IMAGENET_STD)
def mobilenet_v2(num_classes=1000, img_size=224, in_chans=3, width: float = 1.0):
    return tvm.mobilenet_v2(num_classes=num_classes, width_mult=width)


@register_model("mobilenet_v2_tiny", "CPU-tiny torchvision MobileNetV2 (width 0.25)", "cnn", "features.0.0", "classifier.1")
def mobilenet_v2_tiny(num_classes=10, img_size=32, in_chans=3, width: float = 1.0):
    return tvm.mobilenet_v2(num_classes=num_classes, width_mult=0.25 * width)
