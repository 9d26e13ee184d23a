"""BatchNorm teachers for SRe2L / DWA (recover) and the KD evaluation: where they come from, how they load.

A teacher is named by a *spec* string:

- ``DIR``: a directory written by ``fastdd squeeze`` (``teacher.pt``: a plain state dict;
  ``teacher.json``: model name, channels, classes, image size, dataset, recipe, test accuracy);
- ``resnet18:PATH`` / ``resnet50:PATH``: a torchvision-format state dict in a local file (e.g.
  ``resnet18-f37072fd.pth``), loaded into :class:`fastdd.models.tv_resnet.TVResNet` with the ImageNet
  stem; ``resnet18s:PATH`` / ``resnet50s:PATH``: the same layout with the small-image stem (the SRe2L /
  DWA CIFAR and Tiny-ImageNet teachers). A file holding ``{"state_dict": ...}`` or ``{"model": ...}`` and
  ``module.`` key prefixes (DataParallel) are accepted.

Nothing is ever downloaded. A missing file, a file of another architecture or of another number of
classes / channels is a ``FileNotFoundError`` / ``ValueError`` naming the file and the first differences.
:func:`load_teacher` returns the network in eval mode with ``requires_grad`` off on every parameter.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

import torch
from torch import nn

from .checkpoint import load as load_file
from .models import get_model
from .models.tv_resnet import first_mismatch

TEACHER_FILE = "teacher.pt"
TEACHER_META = "teacher.json"

#: spec prefix -> registry model name
FILE_SPECS = {"resnet18": "TVResNet18", "resnet50": "TVResNet50", "resnet18s": "TVResNet18S",
              "resnet50s": "TVResNet50S"}


def parse_spec(spec: str) -> Tuple[str, Path]:
    """``(model name or "", path)`` of a teacher spec: ``("TVResNet18", PATH)`` for ``resnet18:PATH``,
    ``("", DIR)`` for a squeeze directory."""
    if not isinstance(spec, str) or not spec:
        raise ValueError("teacher: expected a squeeze directory or ARCH:PATH (ARCH one of "
                         f"{sorted(FILE_SPECS)}), got {spec!r}")
    head, sep, tail = spec.partition(":")
    if sep and head.lower() in FILE_SPECS:
        return FILE_SPECS[head.lower()], Path(tail).expanduser()
    return "", Path(spec).expanduser()


def _state_dict_of(obj, path: Path) -> dict:
    """The tensor dict inside a loaded checkpoint (unwraps ``state_dict`` / ``model``, drops ``module.``)."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"teacher: {path} does not hold a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _load_strict(model: nn.Module, state: dict, path: Path, what: str) -> None:
    problems = first_mismatch(model, state)
    if problems:
        raise ValueError(f"teacher: {path} does not fit {what}: " + "; ".join(problems))
    model.load_state_dict(state)


def load_teacher(spec: str, channels: int, num_classes: int, image_size, device="cpu") -> Tuple[nn.Module, dict]:
    """The frozen teacher named by ``spec`` for images [N, channels, *image_size] and ``num_classes``
    classes: (network in eval mode, info dict with ``model``, ``source`` and the squeeze metadata)."""
    model_name, path = parse_spec(spec)
    image_size = tuple(int(s) for s in image_size)
    if model_name:
        if not path.is_file():
            raise FileNotFoundError(f"teacher: {path} does not exist (fastdd never downloads weights; pass the "
                                    "path of a local torchvision state dict)")
        net = get_model(model_name, channels, num_classes, image_size, generator=torch.Generator().manual_seed(0))
        _load_strict(net, _state_dict_of(load_file(path), path), path,
                     f"{model_name} with {channels} input channels and {num_classes} classes")
        info = {"model": model_name, "source": str(path)}
    else:
        meta_path = path / TEACHER_META
        if not path.is_dir() or not meta_path.is_file():
            raise FileNotFoundError(f"teacher: {path} is not a teacher directory (no {TEACHER_META}); run "
                                    f"`fastdd squeeze --out {path}` or pass resnet18:PATH")
        try:
            info = json.loads(meta_path.read_text())
            want = (int(info["channels"]), int(info["num_classes"]), tuple(int(s) for s in info["image_size"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"teacher: {meta_path} is damaged ({type(exc).__name__}: {exc})") from exc
        have = (channels, num_classes, image_size)
        if want != have:
            raise ValueError(f"teacher: {path} was trained for (channels, classes, image size) {want}, the data "
                             f"here is {have}")
        if not (path / TEACHER_FILE).is_file():
            raise FileNotFoundError(f"teacher: {path / TEACHER_FILE} does not exist (squeeze not finished; rerun "
                                    "`fastdd squeeze --resume`)")
        net = get_model(info["model"], channels, num_classes, image_size, generator=torch.Generator().manual_seed(0))
        _load_strict(net, _state_dict_of(load_file(path / TEACHER_FILE), path / TEACHER_FILE),
                     path / TEACHER_FILE, info["model"])
        info = dict(info, source=str(path))
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        raise ValueError(f"teacher: {info['model']} has no BatchNorm layer; SRe2L/DWA need a BatchNorm teacher "
                         "(e.g. ConvNetBN, ResNet18BN, TVResNet18S)")
    return net, info
