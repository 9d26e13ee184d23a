"""ResNet-18 / ResNet-50 with torchvision's state-dict layout (SRe2L / DWA teachers and students).

The module names are torchvision's (``conv1``, ``bn1``, ``layer1..4.{i}.conv1/bn1/conv2/bn2[/conv3/bn3]``,
``layerK.0.downsample.0/1``, ``fc``), so a torchvision checkpoint such as ``resnet18-f37072fd.pth``
(ImageNet-1K, 1000 classes) loads with ``load_state_dict`` unchanged, and a teacher trained here can be
read by torchvision code. No torchvision import is needed.

Two stems (spec ``lowrank_dwa_theory.md`` §2.1):

- ``stem="imagenet"``: 7x7 stride-2 conv (padding 3) + BN + ReLU + 3x3 stride-2 max-pool, for 224x224
  inputs (torchvision's network);
- ``stem="small"``: 3x3 stride-1 conv (padding 1) + BN + ReLU, no max-pool: the CIFAR / Tiny-ImageNet
  variant the SRe2L and DWA squeeze scripts build by replacing ``conv1`` and ``maxpool`` of torchvision's
  model (so their checkpoints load here too: the max-pool has no parameters).

Stages of 64, 128, 256, 512 planes (x4 for the bottleneck), strides 1, 2, 2, 2, global average pooling,
``fc``. BatchNorm everywhere (eps 1e-5, momentum 0.1, torchvision's). Initialisation is PyTorch's
default (through :func:`fastdd.models.get_model`'s generator), not torchvision's kaiming-normal scheme.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_positive_int
from ._common import ImSize, check_images, parse_im_size

STEMS = ("imagenet", "small")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _downsample(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class TVBasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))``."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(cin, planes, stride) if stride != 1 or cin != planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TVBottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNet v1.5: the stride sits on the 3x3 conv), expansion 4."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = _downsample(cin, out, stride) if stride != 1 or cin != out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TVResNet(nn.Module):
    """torchvision-layout ResNet (module docstring).

    Args:
        channel: input channels (3 for ImageNet checkpoints).
        num_classes: logits (1000 for ImageNet checkpoints).
        depth: 18 (BasicBlock, [2, 2, 2, 2]) or 50 (Bottleneck, [3, 4, 6, 3]).
        stem: ``"imagenet"`` or ``"small"``.
        im_size: input ``(H, W)``.

    ``embed(x) [N, C, H, W] -> [N, feature_dim]`` (512 or 2048), ``forward`` gives the logits.
    """

    LAYOUTS = {18: (TVBasicBlock, (2, 2, 2, 2)), 50: (TVBottleneck, (3, 4, 6, 3))}

    def __init__(self, channel: int, num_classes: int, depth: int = 18, stem: str = "small",
                 im_size: ImSize = (32, 32)) -> None:
        super().__init__()
        self.channel = check_positive_int("channel", channel)
        self.num_classes = check_positive_int("num_classes", num_classes)
        if depth not in self.LAYOUTS:
            raise ValueError(f"depth: expected one of {sorted(self.LAYOUTS)}, got {depth!r}")
        if stem not in STEMS:
            raise ValueError(f"stem: expected one of {list(STEMS)}, got {stem!r}")
        self.depth, self.stem, self.im_size = depth, stem, parse_im_size(im_size)
        block, counts = self.LAYOUTS[depth]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(self.channel, 64, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(self.channel, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, stride, n) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2), counts), start=1):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, stride if j == 0 else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.feature_dim = cin
        self.fc = nn.Linear(cin, self.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled last-stage features ``[N, feature_dim]``."""
        check_images(x, self.channel, self.im_size)
        out = F.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            out = F.max_pool2d(out, kernel_size=3, stride=2, padding=1)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]``."""
        return self.fc(self.embed(x))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, stem={self.stem!r}, num_classes={self.num_classes}, im_size={self.im_size}"


def tv_resnet_kwargs(depth: int, stem: str) -> dict:
    """Registry constructor arguments of a torchvision-layout ResNet."""
    return {"depth": depth, "stem": stem}


def first_mismatch(model: nn.Module, state: dict) -> Sequence[str]:
    """Human-readable differences between ``model``'s state dict and ``state`` (missing keys, unexpected
    keys, shape mismatches), at most five, empty when ``state`` loads strictly."""
    mine = model.state_dict()
    out = [f"missing key {k!r}" for k in mine if k not in state]
    out += [f"unexpected key {k!r}" for k in state if k not in mine]
    out += [f"{k}: shape {tuple(state[k].shape)} in the file, {tuple(v.shape)} expected" for k, v in mine.items()
            if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    return out[:5]
