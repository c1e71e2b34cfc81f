"""CIFAR-style CNNs: ResNet-20/56 (He et al. 2016, 3 stages of BasicBlocks) and VGG-16-BN.

Shortcuts that change shape are 1×1 conv + BN projections (option B), so every residual
group is a real tensor dependency that torch-pruning can follow. `width` scales all
channel counts (rounded, at least 1); `widths` sets the stage widths directly.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from sparsebench.models.registry import register_model


def _scaled(channels: Sequence[int], width: float):
    return tuple(max(1, int(round(c * width))) for c in channels)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, widths=(16, 32, 64), num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _cifar_resnet(depth: int, base_widths, num_classes, in_chans, width: float, widths: Optional[Sequence[int]]):
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    widths = tuple(widths) if widths else _scaled(base_widths, width)
    return CifarResNet((depth - 2) // 6, widths, num_classes, in_chans)


# name: (description, depth, base stage widths)
CIFAR_RESNETS = {
    "resnet20": ("CIFAR ResNet-20 (3x3 BasicBlocks, widths 16/32/64), 0.27M params", 20, (16, 32, 64)),
    "resnet56": ("CIFAR ResNet-56 (9 BasicBlocks per stage, widths 16/32/64), 0.85M params", 56, (16, 32, 64)),
    "resnet20_tiny": ("CPU-tiny CIFAR ResNet-8 (1 block per stage, widths 8/16/32)", 8, (8, 16, 32)),
    "resnet56_tiny": ("CPU-tiny CIFAR ResNet-14 (2 blocks per stage, widths 8/16/32)", 14, (8, 16, 32)),
}


def _resnet_factory(depth: int, base_widths):
    def factory(num_classes=10, img_size=32, in_chans=3, width: float = 1.0, widths=None):
        return _cifar_resnet(depth, base_widths, num_classes, in_chans, width, widths)

    return factory


for _name, (_description, _depth, _widths) in CIFAR_RESNETS.items():
    register_model(_name, _description, "cnn", "conv1", "fc")(_resnet_factory(_depth, _widths))


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class CifarVGG(nn.Module):
    """VGG with BN for small images: conv stacks, ceil-mode max-pools, global pool, one linear."""

    def __init__(self, cfg, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        layers, c_in = [], in_chans
        for v in cfg:
            if v == "M":
                # ceil_mode keeps a 1×1 map alive when small inputs run out of resolution
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def _vgg(num_classes, in_chans, width, divisor=1):
    cfg = tuple(v if v == "M" else max(1, int(round(v * width / divisor))) for v in VGG16_CFG)
    return CifarVGG(cfg, num_classes, in_chans)


@register_model("vgg16_bn", "CIFAR VGG-16 with BatchNorm, global-pool classifier, 14.7M params", "cnn", "features.0", "classifier")
def vgg16_bn(num_classes=10, img_size=32, in_chans=3, width: float = 1.0):
    return _vgg(num_classes, in_chans, width)


@register_model("vgg16_bn_tiny", "CPU-tiny VGG-16-BN (channels / 8)", "cnn", "features.0", "classifier")
def vgg16_bn_tiny(num_classes=10, img_size=32, in_chans=3, width: float = 1.0):
    return _vgg(num_classes, in_chans, width, divisor=8)
