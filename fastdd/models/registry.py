"""Models by name (the reference's ``utils.py::get_network`` names, minus LeNet/AlexNet/VGG).

=====================  ===========================================================================
name                   network
=====================  ===========================================================================
ConvNet                ConvNet-3, width 128, ReLU, instance norm, average pooling (the DM default)
ConvNetD1 .. D4        depth 1 .. 4 (D4 is the usual 64x64 TinyImageNet network)
ConvNetW32 .. W256     width 32 / 64 / 128 / 256
ConvNetAS / AR / AL    activation sigmoid / relu / leakyrelu
ConvNetASwish          swish activation
ConvNetASwishBN        swish activation + batch norm
ConvNetW32BN           width 32 + batch norm (a quick BN teacher for SRe2L/DWA on the CPU)
ConvNetNN/BN/LN/IN/GN  norm none / batchnorm / layernorm / instancenorm / groupnorm
ConvNetNP / MP / AP    pooling none / max / average
ResNet18               CIFAR-style ResNet-18, instance norm (GroupNorm(C, C)), as the reference
ResNet18IN             same as ResNet18 (explicit name)
ResNet18BN             CIFAR-style ResNet-18 with BatchNorm2d
TVResNet18S            torchvision-layout ResNet-18, small-image stem (3x3 stride 1, no max-pool): SRe2L/DWA teachers
TVResNet18             torchvision-layout ResNet-18, ImageNet stem (7x7 stride 2 + max-pool), for 224x224
TVResNet50S/50         the same with ResNet-50 (bottleneck) stages
MLP                    flatten -> 128 -> ReLU -> 128 -> ReLU -> classes
=====================  ===========================================================================
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..validation import check_positive_int
from ._common import ImSize, parse_im_size
from .convnet import ConvNet
from .init import init_parameters
from .mlp import MLP
from .resnet import ResNet18
from .tv_resnet import TVResNet, tv_resnet_kwargs


def _convnet(**overrides: Any) -> Tuple[Callable[..., nn.Module], Dict[str, Any]]:
    return ConvNet, overrides


_REGISTRY: Dict[str, Tuple[Callable[..., nn.Module], Dict[str, Any]]] = {
    "ConvNet": _convnet(),
    **{f"ConvNetD{d}": _convnet(depth=d) for d in (1, 2, 3, 4)},
    **{f"ConvNetW{w}": _convnet(width=w) for w in (32, 64, 128, 256)},
    "ConvNetAS": _convnet(act="sigmoid"),
    "ConvNetAR": _convnet(act="relu"),
    "ConvNetAL": _convnet(act="leakyrelu"),
    "ConvNetASwish": _convnet(act="swish"),
    "ConvNetASwishBN": _convnet(act="swish", norm="batchnorm"),
    "ConvNetW32BN": _convnet(width=32, norm="batchnorm"),
    "ConvNetNN": _convnet(norm="none"),
    "ConvNetBN": _convnet(norm="batchnorm"),
    "ConvNetLN": _convnet(norm="layernorm"),
    "ConvNetIN": _convnet(norm="instancenorm"),
    "ConvNetGN": _convnet(norm="groupnorm"),
    "ConvNetNP": _convnet(pool="none"),
    "ConvNetMP": _convnet(pool="maxpooling"),
    "ConvNetAP": _convnet(pool="avgpooling"),
    "ResNet18": (ResNet18, {"norm": "instancenorm"}),
    "ResNet18IN": (ResNet18, {"norm": "instancenorm"}),
    "ResNet18BN": (ResNet18, {"norm": "batchnorm"}),
    "MLP": (MLP, {}),
    "TVResNet18S": (TVResNet, tv_resnet_kwargs(18, "small")),
    "TVResNet18": (TVResNet, tv_resnet_kwargs(18, "imagenet")),
    "TVResNet50S": (TVResNet, tv_resnet_kwargs(50, "small")),
    "TVResNet50": (TVResNet, tv_resnet_kwargs(50, "imagenet")),
}


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer (its samples are then not independent of each other)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def model_names() -> List[str]:
    """All names accepted by :func:`get_model`, in registry order."""
    return list(_REGISTRY)


def get_model(
    name: str,
    channel: int,
    num_classes: int,
    im_size: ImSize,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the network called ``name`` for ``[N, channel, *im_size]`` inputs and ``num_classes`` logits.

    ``kwargs`` override the variant's constructor arguments (e.g. ``get_model("ConvNet", ..., depth=4)``
    or ``get_model("MLP", ..., hidden=256)``). The module is moved to ``device`` (if given) and, when a
    ``generator`` is given, initialised with :func:`init_parameters` from it: the module is built on
    the meta device and materialised, so the global RNG is neither used nor advanced, and
    ``get_model(..., generator=torch.Generator().manual_seed(s))`` equals ``torch.manual_seed(s)``
    followed by the plain constructor, bit for bit. Without a generator, PyTorch's constructors draw
    from the global RNG as usual. The returned
    module is in train mode and exposes ``embed(x) -> [N, feature_dim]`` and ``feature_dim``.

    Raises ``ValueError`` for an unknown name (the message lists the valid ones).
    """
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown model {name!r}; expected one of {model_names()}")
    check_positive_int("channel", channel)
    check_positive_int("num_classes", num_classes)
    im_size = parse_im_size(im_size)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    cls, defaults = _REGISTRY[name]
    args = {**defaults, **kwargs}
    if generator is None:
        model = cls(channel, num_classes, im_size=im_size, **args)
        return model if device is None else model.to(device)
    # Build on the meta device (no allocation, no draw from the global RNG), then materialise and
    # fill every parameter and buffer from the generator.
    with torch.device("meta"):
        model = cls(channel, num_classes, im_size=im_size, **args)
    model = model.to_empty(device=torch.device("cpu") if device is None else device)
    return init_parameters(model, generator)
