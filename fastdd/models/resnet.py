"""ResNet-18 for small images (``networks.py::ResNet`` / ``ResNet18`` / ``ResNet18BN`` in the reference).

CIFAR-style network meant for inputs of at most 64x64 pixels: the stem is a single 3x3 conv with
stride 1 and padding 1 (no 7x7 stride-2 conv, no max-pool), followed by four stages of two
:class:`BasicBlock` each, with 64, 128, 256, 512 channels and strides 1, 2, 2, 2; then global average
pooling to ``[N, 512]`` and ``Linear(512 -> num_classes)``. Convs have no bias.

Norm layers: ``"instancenorm"`` = ``GroupNorm(C, C, affine=True)`` (the reference's default, so the
registry's ``"ResNet18"`` is the instance-norm network, as in the reference), ``"batchnorm"`` =
``BatchNorm2d(C)`` (registry name ``"ResNet18BN"``).

Deviation from the reference: the reference pools with a fixed ``avg_pool2d(out, 4)``, which is a
global average for 28x28 and 32x32 inputs (the last stage is 4x4) but breaks the classifier for
64x64 inputs. Here the pooling is a global average (``adaptive_avg_pool2d(out, 1)``), identical for
28/32 px inputs and well defined for any size, so ``feature_dim`` is always 512.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_positive_int
from ._common import ImSize, check_images, parse_im_size

RESNET_NORMS = ("instancenorm", "batchnorm")


def _norm(norm: str, c: int) -> nn.Module:
    return nn.GroupNorm(c, c, affine=True) if norm == "instancenorm" else nn.BatchNorm2d(c)


class BasicBlock(nn.Module):
    """Residual block ``relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))``; 3x3 convs, no bias.

    ``[N, in_planes, H, W] -> [N, planes, ceil(H/stride), ceil(W/stride)]``. The shortcut is the
    identity, or a strided 1x1 conv + norm when the shape changes.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "instancenorm") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                _norm(norm, planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (see the module docstring).

    Args:
        channel: input channels.
        num_classes: number of logits.
        norm: ``"instancenorm"`` (default, as the reference's ``ResNet18``) or ``"batchnorm"``.
        im_size: input ``(H, W)`` (or one int); at most 64 px is the intended range (any size >= 1
            works, the stem keeps the full resolution so large inputs are expensive).

    Attributes:
        feature_dim: 512, the length of :meth:`embed`'s output.
    """

    def __init__(self, channel: int, num_classes: int, norm: str = "instancenorm", im_size: ImSize = (32, 32)) -> None:
        super().__init__()
        self.channel = check_positive_int("channel", channel)
        self.num_classes = check_positive_int("num_classes", num_classes)
        if norm not in RESNET_NORMS:
            raise ValueError(f"norm: expected one of {list(RESNET_NORMS)}, got {norm!r}")
        self.norm = norm
        self.im_size = parse_im_size(im_size)
        self.conv1 = nn.Conv2d(self.channel, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = _norm(norm, 64)
        in_planes = 64
        for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            blocks = nn.Sequential(
                BasicBlock(in_planes, planes, stride, norm), BasicBlock(planes, planes, 1, norm)
            )
            setattr(self, f"layer{i}", blocks)
            in_planes = planes
        self.feature_dim = 512
        self.classifier = nn.Linear(self.feature_dim, self.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled last-stage features: ``[N, channel, H, W] -> [N, 512]``."""
        check_images(x, self.channel, self.im_size)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``classifier(embed(x))``: ``[N, channel, H, W] -> [N, num_classes]``."""
        return self.classifier(self.embed(x))

    def extra_repr(self) -> str:
        return f"channel={self.channel}, num_classes={self.num_classes}, norm={self.norm!r}, im_size={self.im_size}"
