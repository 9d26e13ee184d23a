"""The ConvNet family used by DC / DSA / DM / DANCE (``networks.py::ConvNet`` in the reference).

Architecture (spec ``dm_dance.md`` section 1.2), for ``d = 0 .. depth-1``::

    Conv2d(in -> width, 3x3, stride 1, padding 1, bias) -> norm -> act -> pool

then flatten and one ``Linear(feature_dim -> num_classes)``.

- ``norm``: ``"instancenorm"`` = ``GroupNorm(width, width, affine=True)`` (per sample and channel over
  H x W, no running statistics), ``"batchnorm"`` = ``BatchNorm2d(width)``, ``"layernorm"`` =
  ``LayerNorm([width, H, W], elementwise_affine=True)`` over the post-conv map, ``"groupnorm"`` =
  ``GroupNorm(4, width)``, ``"none"`` (no layer at all).
- ``act``: ``"relu"``, ``"sigmoid"``, ``"leakyrelu"`` (slope 0.01), ``"swish"`` (``x * sigmoid(x)``).
- ``pool``: ``"avgpooling"`` (``AvgPool2d(2, 2)``), ``"maxpooling"`` (``MaxPool2d(2, 2)``), ``"none"``.
- 28x28 single-channel inputs (MNIST, Fashion-MNIST): the first conv uses padding 3, so the 28x28
  image becomes a 32x32 map and the features have the same shape as CIFAR's
  (``feature_dim = 2048`` at depth 3). Other inputs (including 3-channel 28x28) use padding 1
  everywhere, so e.g. a 3x28x28 ConvNet-3 has ``feature_dim = 128 * 3 * 3``.

The layer layout (``features`` as an ``nn.Sequential`` with the norm / pool entries omitted when
``"none"``, then ``classifier``) matches the reference, so reference state dicts load unchanged.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from ..validation import check_positive_int
from ._common import ImSize, check_images, parse_im_size

ACTIVATIONS = ("relu", "sigmoid", "leakyrelu", "swish")
NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
POOLS = ("avgpooling", "maxpooling", "none")


class Swish(nn.Module):
    """Swish activation ``x * sigmoid(x)`` (elementwise, any shape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def _choice(name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {list(options)}, got {value!r}")
    return value


class ReLU(nn.ReLU):
    """ReLU that works in place when autograd is off (no-grad forwards: DM's real side, evaluation's
    test pass), saving one activation-sized allocation per block; out of place otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(x) if not torch.is_grad_enabled() else torch.relu(x)


class LeakyReLU(nn.LeakyReLU):
    """LeakyReLU, in place when autograd is off (see :class:`ReLU`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.leaky_relu(x, self.negative_slope, inplace=not torch.is_grad_enabled())


def _make_act(act: str) -> nn.Module:
    if act == "relu":
        return ReLU()
    if act == "sigmoid":
        return nn.Sigmoid()
    if act == "leakyrelu":
        return LeakyReLU(negative_slope=0.01)
    return Swish()


def _make_norm(norm: str, c: int, h: int, w: int) -> nn.Module:
    if norm == "instancenorm":
        return nn.GroupNorm(c, c, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(c, affine=True)
    if norm == "layernorm":
        return nn.LayerNorm([c, h, w], elementwise_affine=True)
    if norm == "groupnorm":
        return nn.GroupNorm(4, c, affine=True)
    raise AssertionError(norm)  # "none" never reaches here


class ConvNet(nn.Module):
    """ConvNet-``depth`` of width ``width``: ``depth`` conv-norm-act-pool blocks and a linear classifier.

    Args:
        channel: input channels (1 or 3 for the usual datasets).
        num_classes: number of output logits.
        width: conv channels in every block (default 128).
        depth: number of blocks (default 3).
        act / norm / pool: see the module docstring for the accepted names.
        im_size: input ``(H, W)`` (or one int); the model only accepts inputs of exactly this size.

    Attributes:
        feature_shape: ``(width, H', W')`` shape of the last block's output.
        feature_dim: ``width * H' * W'``, the length of :meth:`embed`'s output (2048 for ConvNet-3 on
            32x32 or 1x28x28 inputs, 8192 on 64x64, 2048 for depth 4 on 64x64).
        first_padding: padding of the first conv (3 for 1-channel 28x28, else 1).
    """

    def __init__(
        self,
        channel: int,
        num_classes: int,
        width: int = 128,
        depth: int = 3,
        act: str = "relu",
        norm: str = "instancenorm",
        pool: str = "avgpooling",
        im_size: ImSize = (32, 32),
    ) -> None:
        super().__init__()
        self.channel = check_positive_int("channel", channel)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.width = check_positive_int("width", width)
        self.depth = check_positive_int("depth", depth)
        self.act = _choice("act", act, ACTIVATIONS)
        self.norm = _choice("norm", norm, NORMS)
        self.pool = _choice("pool", pool, POOLS)
        self.im_size = parse_im_size(im_size)
        if self.norm == "groupnorm" and self.width % 4:
            raise ValueError(f"width: must be divisible by 4 for norm='groupnorm', got {width}")

        self.first_padding = 3 if (self.channel == 1 and self.im_size == (28, 28)) else 1
        layers: List[nn.Module] = []
        c, (h, w) = self.channel, self.im_size
        for d in range(self.depth):
            pad = self.first_padding if d == 0 else 1
            layers.append(nn.Conv2d(c, self.width, kernel_size=3, stride=1, padding=pad, bias=True))
            c, h, w = self.width, h + 2 * pad - 2, w + 2 * pad - 2
            if self.norm != "none":
                layers.append(_make_norm(self.norm, c, h, w))
            layers.append(_make_act(self.act))
            if self.pool != "none":
                if h < 2 or w < 2:
                    raise ValueError(
                        f"depth: {self.depth} pooling blocks shrink a {self.im_size} input below 1x1"
                    )
                layers.append(nn.AvgPool2d(2, 2) if self.pool == "avgpooling" else nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.feature_shape: Tuple[int, int, int] = (c, h, w)
        self.feature_dim = c * h * w
        self.classifier = nn.Linear(self.feature_dim, self.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """DM embedding: the flattened output of the feature stack, ``[N, C, H, W] -> [N, feature_dim]``."""
        check_images(x, self.channel, self.im_size)
        return self.features(x).flatten(1)

    def embed_with_taps(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Embedding plus the "style" taps of every block.

        Returns ``(embed(x) [N, feature_dim], [tap_0, ..., tap_{depth-1}])`` where ``tap_d`` is block d's
        activation output (after conv, norm and activation, before pooling), ``[N, width, H_d, W_d]``.
        This is what DDM's reference actually matches: its norm output is overwritten by an in-place
        ReLU (spec ``ddm_mim4dd.md`` 1.3), so the post-activation, pre-pool map is the faithful tap.
        """
        check_images(x, self.channel, self.im_size)
        taps: List[torch.Tensor] = []
        h = x
        for layer in self.features:
            is_pool = isinstance(layer, (nn.AvgPool2d, nn.MaxPool2d))
            if is_pool:
                taps.append(h)
            h = layer(h)
            if not is_pool and self.pool == "none" and isinstance(layer, (nn.ReLU, nn.Sigmoid, nn.LeakyReLU, Swish)):
                taps.append(h)
        return h.flatten(1), taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``classifier(embed(x))``: ``[N, channel, H, W] -> [N, num_classes]``."""
        return self.classifier(self.embed(x))

    def extra_repr(self) -> str:
        return (
            f"channel={self.channel}, num_classes={self.num_classes}, width={self.width}, "
            f"depth={self.depth}, act={self.act!r}, norm={self.norm!r}, pool={self.pool!r}, "
            f"im_size={self.im_size}, feature_dim={self.feature_dim}"
        )
