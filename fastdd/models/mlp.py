"""Fully connected baseline (``networks.py::MLP`` in the reference).

``flatten -> Linear(channel*H*W -> hidden) -> ReLU -> Linear(hidden -> hidden) -> ReLU ->
Linear(hidden -> num_classes)``, ``hidden = 128`` by default: the reference's MLP (two hidden layers of
128 units, layer names ``fc_1``, ``fc_2``, ``fc_3``). ``num_hidden_layers=1`` gives the plain
two-layer perceptron ``Linear -> ReLU -> Linear``.

The reference sizes ``fc_1`` as 28*28 for 1-channel and 32*32*3 for 3-channel data; here the input
size is ``channel * H * W`` from ``im_size``, which agrees on those datasets and also works elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_positive_int
from ._common import ImSize, check_images, parse_im_size


class MLP(nn.Module):
    """Multi-layer perceptron on flattened images.

    Args:
        channel, num_classes, im_size: input channels, number of logits, input ``(H, W)``.
        hidden: width of every hidden layer (default 128).
        num_hidden_layers: 1 or 2 (default 2, as the reference).

    Attributes:
        feature_dim: ``hidden``, the length of :meth:`embed`'s output (last hidden activation).
    """

    def __init__(
        self,
        channel: int,
        num_classes: int,
        im_size: ImSize = (32, 32),
        hidden: int = 128,
        num_hidden_layers: int = 2,
    ) -> None:
        super().__init__()
        self.channel = check_positive_int("channel", channel)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.im_size = parse_im_size(im_size)
        self.hidden = check_positive_int("hidden", hidden)
        check_positive_int("num_hidden_layers", num_hidden_layers)
        if num_hidden_layers > 2:
            raise ValueError(f"num_hidden_layers: must be 1 or 2, got {num_hidden_layers}")
        self.num_hidden_layers = num_hidden_layers
        in_features = self.channel * self.im_size[0] * self.im_size[1]
        self.fc_1 = nn.Linear(in_features, self.hidden)
        self.fc_2 = nn.Linear(self.hidden, self.hidden) if num_hidden_layers == 2 else None
        self.fc_3 = nn.Linear(self.hidden, self.num_classes)
        self.feature_dim = self.hidden

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden activation: ``[N, channel, H, W] -> [N, hidden]``."""
        check_images(x, self.channel, self.im_size)
        out = F.relu(self.fc_1(x.flatten(1)))
        if self.fc_2 is not None:
            out = F.relu(self.fc_2(out))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: ``[N, channel, H, W] -> [N, num_classes]``."""
        return self.fc_3(self.embed(x))
