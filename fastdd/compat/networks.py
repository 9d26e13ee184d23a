"""The reference repository's networks (``networks.py`` of VICO-UoE/DatasetCondensation) under their
names and constructor signatures, with the same state-dict layouts (parameter names and shapes), so
a checkpoint written by a reference script loads here and vice versa.

``MLP``, ``ConvNet``, ``ResNet18`` and ``ResNet18BN`` are fastdd's own models (:mod:`fastdd.models`)
behind the reference signatures; ``LeNet``, ``AlexNet``, ``AlexNetBN``, ``VGG11``, ``VGG11BN``,
``ResNet18_AP`` and ``ResNet18BN_AP`` are built here from ``torch.nn``. Every network maps
``[N, channel, H, W]`` to logits ``[N, num_classes]`` and has ``embed(x) -> [N, D]`` (the input of the
last linear layer). Inputs are 28x28 for ``channel == 1`` and 32x32 otherwise, as in the reference.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models.convnet import ConvNet as _FastConvNet
from ..models.mlp import MLP as _FastMLP
from ..models.resnet import ResNet18 as _FastResNet18

__all__ = ["MLP", "ConvNet", "LeNet", "AlexNet", "AlexNetBN", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN",
           "ResNet18_AP", "ResNet18BN_AP"]


def _reference_size(channel: int) -> Tuple[int, int]:
    """The reference's implicit input size: 28x28 for one channel (MNIST-like), else 32x32."""
    return (28, 28) if channel == 1 else (32, 32)


class _Embedded(nn.Module):
    """``features`` (a Sequential) then the last linear layer ``head_name``; ``embed`` = flattened features."""

    head_name = "classifier"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened ``features(x)``: ``[N, C, H, W] -> [N, D]``."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]``."""
        return getattr(self, self.head_name)(self.embed(x))


def MLP(channel: int, num_classes: int) -> nn.Module:
    """Three linear layers (``fc_1``, ``fc_2``, ``fc_3``; 128 hidden units, ReLU)."""
    return _FastMLP(channel, num_classes, im_size=_reference_size(channel))


def ConvNet(channel: int, num_classes: int, net_width: int = 128, net_depth: int = 3, net_act: str = "relu",
            net_norm: str = "instancenorm", net_pooling: str = "avgpooling", im_size=(32, 32)) -> nn.Module:
    """ConvNet-``net_depth`` (``features.*`` conv/norm/act/pool blocks, ``classifier``), fastdd's model."""
    return _FastConvNet(channel, num_classes, width=net_width, depth=net_depth, act=net_act, norm=net_norm,
                        pool=net_pooling, im_size=tuple(im_size))


class LeNet(_Embedded):
    """LeNet-5: two conv(5x5)-ReLU-maxpool blocks, then ``fc_1`` (120) ``fc_2`` (84) ``fc_3``."""

    head_name = "fc_3"

    def __init__(self, channel: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channel, 6, 5, padding=2 if channel == 1 else 0), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2))
        self.fc_1, self.fc_2, self.fc_3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 84-d input of ``fc_3``."""
        h = self.features(x).flatten(1)
        return F.relu(self.fc_2(F.relu(self.fc_1(h))))


def _alexnet_features(channel: int, batchnorm: bool) -> nn.Sequential:
    """AlexNet's five convs (128, 192, 256, 192, 192) with three 2x2 max-pools; optional BN after each conv."""
    spec = [(channel, 128, 5, 4 if channel == 1 else 2, True), (128, 192, 5, 2, True), (192, 256, 3, 1, False),
            (256, 192, 3, 1, False), (192, 192, 3, 1, True)]
    layers: List[nn.Module] = []
    for cin, cout, k, pad, pool in spec:
        layers.append(nn.Conv2d(cin, cout, k, padding=pad))
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU())
        if pool:
            layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


class AlexNet(_Embedded):
    """AlexNet for 28/32-pixel inputs; head ``fc`` on 192x4x4 features."""

    head_name = "fc"

    def __init__(self, channel: int, num_classes: int, _batchnorm: bool = False):
        super().__init__()
        self.features = _alexnet_features(channel, _batchnorm)
        self.fc = nn.Linear(192 * 4 * 4, num_classes)


class AlexNetBN(AlexNet):
    """AlexNet with batch norm after every conv."""

    def __init__(self, channel: int, num_classes: int):
        super().__init__(channel, num_classes, _batchnorm=True)


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class _VGG(_Embedded):
    """VGG with conv-norm-ReLU units (instance norm as GroupNorm(C, C), or batch norm), ``classifier``."""

    def __init__(self, cfg: Sequence, channel: int, num_classes: int, norm: str = "instancenorm"):
        super().__init__()
        layers: List[nn.Module] = []
        cin = channel
        for i, v in enumerate(cfg):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            norm_layer = nn.GroupNorm(v, v, affine=True) if norm == "instancenorm" else nn.BatchNorm2d(v)
            layers += [nn.Conv2d(cin, v, 3, padding=3 if channel == 1 and i == 0 else 1), norm_layer, nn.ReLU()]
            cin = v
        layers.append(nn.AvgPool2d(1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)


def VGG11(channel: int, num_classes: int) -> nn.Module:
    """VGG-11 with instance norm."""
    return _VGG(_VGG11, channel, num_classes)


def VGG11BN(channel: int, num_classes: int) -> nn.Module:
    """VGG-11 with batch norm."""
    return _VGG(_VGG11, channel, num_classes, norm="batchnorm")


def ResNet18(channel: int, num_classes: int) -> nn.Module:
    """ResNet-18 with instance norm (fastdd's model: ``conv1``, ``bn1``, ``layer1..4``, ``classifier``)."""
    return _FastResNet18(channel, num_classes, norm="instancenorm", im_size=_reference_size(channel))


def ResNet18BN(channel: int, num_classes: int) -> nn.Module:
    """ResNet-18 with batch norm."""
    return _FastResNet18(channel, num_classes, norm="batchnorm", im_size=_reference_size(channel))


def _norm(norm: str, c: int) -> nn.Module:
    return nn.GroupNorm(c, c, affine=True) if norm == "instancenorm" else nn.BatchNorm2d(c)


class _BlockAP(nn.Module):
    """Basic block whose stride-2 conv is a stride-1 conv followed by 2x2 average pooling."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.stride = stride
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(norm, cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), _norm(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2, 2), _norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        if self.stride != 1:
            h = F.avg_pool2d(h, 2, 2)
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class _ResNetAP(nn.Module):
    """ResNet-18 "AP" variant; ``classifier`` on the flattened 512 x s x s map (s = 3 for 28x28, 4 for 32x32)."""

    def __init__(self, channel: int, num_classes: int, norm: str):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channel, 64, 3, padding=1, bias=False), _norm(norm, 64)
        cin, stages = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_BlockAP(cin, planes, stride, norm), _BlockAP(planes, planes, 1, norm)))
            cin = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        side = 3 if channel == 1 else 4
        self.classifier = nn.Linear(512 * side * side, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(h)))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def ResNet18_AP(channel: int, num_classes: int) -> nn.Module:
    """ResNet-18-AP with instance norm."""
    return _ResNetAP(channel, num_classes, "instancenorm")


def ResNet18BN_AP(channel: int, num_classes: int) -> nn.Module:
    """ResNet-18-AP with batch norm."""
    return _ResNetAP(channel, num_classes, "batchnorm")
