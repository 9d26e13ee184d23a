"""The reference repository's ``utils.py`` API (VICO-UoE/DatasetCondensation) on fastdd's machinery.

Same public names, signatures, argument-namespace fields and return types as the reference, so a
script written against ``from utils import ...`` runs with ``from fastdd.compat.utils import ...``
(or unchanged through ``python -m fastdd.compat SCRIPT.py``). What differs:

* :func:`get_dataset` reads through :func:`fastdd.data.load_dataset` (no torchvision) and returns
  tensor-backed :class:`TensorDataset` splits; SVHN is not supported by fastdd's readers.
* :func:`DiffAugment` is :class:`fastdd.augment.DSA`: ``seed >= 0`` seeds a fresh
  ``torch.Generator`` and applies one transform to the whole batch (equal seeds -> identical
  transforms, the reference's siamese use); ``seed == -1`` draws per sample from ``param``'s own
  generator. The global RNG is never reseeded; the random streams differ from the reference's.
* :func:`get_network` initialises from an explicit generator (``seed=`` keyword; default, like the
  reference, a time-derived seed); unknown names raise ``ValueError`` instead of calling ``exit``.
* :func:`evaluate_synset` trains with fastdd's evaluation loop (:mod:`fastdd.evaluate`: SGD momentum
  0.9, weight decay 5e-4, lr x0.1 after half the epochs, DSA per sample) on the given network.
"""
from __future__ import annotations

import time
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..augment import DSA, DSAParams
from ..matchers.gradient import gradient_distance, layer_distance_ours
from ..methods.dc import get_loops as _dc_get_loops
from ..models import init_parameters
from . import networks as _nets

__all__ = ["get_dataset", "TensorDataset", "get_default_convnet_setting", "get_network", "get_time",
           "distance_wb", "match_loss", "get_loops", "epoch", "evaluate_synset", "augment", "get_daparam",
           "get_eval_pool", "ParamDiffAug", "DiffAugment"]

# reference dataset name -> (fastdd name, mean, std) with the reference's statistics
_DATASETS = {
    "MNIST": ("mnist", [0.1307], [0.3081]),
    "FashionMNIST": ("fashion-mnist", [0.2861], [0.3530]),
    "CIFAR10": ("cifar10", [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    "CIFAR100": ("cifar100", [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
}


class TensorDataset(Dataset):
    """Map-style dataset over tensors: ``images`` [N, C, H, W] (detached float), ``labels`` [N]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images.detach().float()
        self.labels = labels.detach()

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __len__(self) -> int:
        return self.images.shape[0]


def get_dataset(dataset: str, data_path: Optional[str]):
    """Load ``dataset`` ('MNIST', 'FashionMNIST', 'CIFAR10', 'CIFAR100') from ``data_path`` (a folder
    holding it, or a parent; ``None`` or a missing folder: fastdd's search path).

    Returns ``(channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader)``
    with tensor-backed train/test :class:`TensorDataset` s (normalised images) and a 256-batch loader.
    """
    from ..data import load_dataset

    if dataset not in _DATASETS:
        raise ValueError(f"dataset: unknown or unsupported dataset {dataset!r}; expected one of {sorted(_DATASETS)}")
    name, mean, std = _DATASETS[dataset]
    import os

    root = data_path if data_path and os.path.isdir(data_path) else None
    train = load_dataset(name, "train", root, mean=mean, std=std)
    test = load_dataset(name, "test", root, mean=mean, std=std)
    dst_train, dst_test = TensorDataset(train.images, train.labels), TensorDataset(test.images, test.labels)
    dst_train.classes = dst_test.classes = list(train.class_names)
    testloader = DataLoader(dst_test, batch_size=256, shuffle=False, num_workers=0)
    channel, im_size = train.channels, tuple(train.image_size)
    return channel, im_size, train.num_classes, list(train.class_names), mean, std, dst_train, dst_test, testloader


def get_default_convnet_setting():
    """(net_width, net_depth, net_act, net_norm, net_pooling) = (128, 3, 'relu', 'instancenorm', 'avgpooling')."""
    return 128, 3, "relu", "instancenorm", "avgpooling"


def _convnet(**over):
    def build(channel, num_classes, im_size):
        w, d, a, n, p = get_default_convnet_setting()
        args = dict(net_width=w, net_depth=d, net_act=a, net_norm=n, net_pooling=p)
        args.update(over)
        return _nets.ConvNet(channel, num_classes, im_size=im_size, **args)
    return build


def _plain(cls):
    return lambda channel, num_classes, im_size: cls(channel, num_classes)


#: get_network names -> builder(channel, num_classes, im_size).
NETWORKS = {
    "MLP": _plain(_nets.MLP), "ConvNet": _convnet(), "LeNet": _plain(_nets.LeNet),
    "AlexNet": _plain(_nets.AlexNet), "AlexNetBN": _plain(_nets.AlexNetBN), "VGG11": _plain(_nets.VGG11),
    "VGG11BN": _plain(_nets.VGG11BN), "ResNet18": _plain(_nets.ResNet18), "ResNet18BN": _plain(_nets.ResNet18BN),
    "ResNet18_AP": _plain(_nets.ResNet18_AP), "ResNet18BN_AP": _plain(_nets.ResNet18BN_AP),
    **{f"ConvNetD{d}": _convnet(net_depth=d) for d in (1, 2, 3, 4)},
    **{f"ConvNetW{w}": _convnet(net_width=w) for w in (32, 64, 128, 256)},
    "ConvNetAS": _convnet(net_act="sigmoid"), "ConvNetAR": _convnet(net_act="relu"),
    "ConvNetAL": _convnet(net_act="leakyrelu"),
    "ConvNetNN": _convnet(net_norm="none"), "ConvNetBN": _convnet(net_norm="batchnorm"),
    "ConvNetLN": _convnet(net_norm="layernorm"), "ConvNetIN": _convnet(net_norm="instancenorm"),
    "ConvNetGN": _convnet(net_norm="groupnorm"),
    "ConvNetNP": _convnet(net_pooling="none"), "ConvNetMP": _convnet(net_pooling="maxpooling"),
    "ConvNetAP": _convnet(net_pooling="avgpooling"),
}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_network(model: str, channel: int, num_classes: int, im_size=(32, 32), *, seed: Optional[int] = None):
    """Build network ``model`` (see :data:`NETWORKS`), initialised from ``Generator(seed)`` (default: a
    time-derived seed, as the reference), on CUDA when available."""
    if model not in NETWORKS:
        raise ValueError(f"model: unknown model {model!r}; expected one of {sorted(NETWORKS)}")
    net = NETWORKS[model](channel, num_classes, tuple(im_size))
    if seed is None:
        seed = int(time.time() * 1000) % 100000
    init_parameters(net, torch.Generator().manual_seed(int(seed)))
    return net.to(_default_device())


def get_time() -> str:
    """Local time as ``[YYYY-mm-dd HH:MM:SS]``."""
    return str(time.strftime("[%Y-%m-%d %H:%M:%S]", time.localtime()))


def distance_wb(gwr: torch.Tensor, gws: torch.Tensor) -> torch.Tensor:
    """Layer distance of the "ours" metric: sum over output rows of 1 - cos; 0-d 0 for 1-D tensors."""
    return layer_distance_ours(gwr, gws)


def match_loss(gw_syn: List[torch.Tensor], gw_real: List[torch.Tensor], args) -> torch.Tensor:
    """Gradient distance ``args.dis_metric`` ('ours' | 'mse' | 'cos') between two gradient lists (0-d)."""
    return gradient_distance(gw_real, gw_syn, args.dis_metric).to(args.device)


def get_loops(ipc: int):
    """(outer_loop, inner_loop) for ``ipc`` images per class (1, 10, 20, 30, 40, 50)."""
    return _dc_get_loops(ipc)  # the table of fastdd's dc / dsa methods; ValueError elsewhere


class ParamDiffAug:
    """DSA parameters (the reference's fields) plus the seeding state ``latestseed`` / ``batchmode`` /
    ``Siamese``, and ``generator``: the explicit generator of ``seed == -1`` calls."""

    def __init__(self, seed: int = 0):
        self.aug_mode = "S"  # 'S': one op per call; 'M': all ops of the strategy
        self.prob_flip = 0.5
        self.ratio_scale = 1.2
        self.ratio_rotate = 15.0
        self.ratio_crop_pad = 0.125
        self.ratio_cutout = 0.5
        self.ratio_noise = 0.05
        self.brightness = 1.0
        self.saturation = 2.0
        self.contrast = 0.5
        self.Siamese = False
        self.latestseed = -1
        self.batchmode = False
        self.generator = torch.Generator().manual_seed(seed)

    def dsa_params(self) -> DSAParams:
        return DSAParams(**{f: getattr(self, f) for f in DSAParams.__dataclass_fields__})


def DiffAugment(x: torch.Tensor, strategy: str = "", seed: int = -1, param: Optional[ParamDiffAug] = None):
    """Differentiable siamese augmentation of ``x`` [N, C, H, W] with ``strategy`` ('color_crop_...').

    ``seed >= 0``: one transform for the whole batch from ``Generator(seed)``, so two calls with the
    same seed transform identically; ``seed == -1``: independent per sample, from ``param.generator``.
    """
    if param is None:
        raise ValueError("param: DiffAugment needs a ParamDiffAug")
    param.batchmode = seed != -1
    param.latestseed = seed
    if not strategy or strategy.lower() == "none":
        return x
    dsa = DSA(strategy, param.dsa_params(), mode=param.aug_mode)
    if seed == -1:
        g = param.generator
        if g.device != x.device:
            g = param.generator = torch.Generator(device=x.device).manual_seed(int(torch.randint(
                1 << 62, (1,), generator=param.generator)))
        return dsa.per_sample(x, g).contiguous()
    g = torch.Generator(device=x.device).manual_seed(int(seed))
    draw = dsa.draw(1, g, tuple(x.shape[-2:]), device=x.device)
    return dsa.apply(x, draw, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)).contiguous()


_DC_GENERATOR = torch.Generator().manual_seed(0)


def augment(images: torch.Tensor, dc_aug_param: Optional[dict], device) -> torch.Tensor:
    """DC's non-differentiable per-sample augmentation (one of ``strategy``'s ops per image: 'crop'
    (pad by ``crop`` with the channel mean, random shift), 'scale' (factor in [1-scale, 1+scale]), 'rotate'
    (uniform integer degrees in [-rotate, rotate)), 'noise' (Gaussian, std ``noise``)). [N, C, H, W]."""
    if not dc_aug_param or dc_aug_param.get("strategy", "none") == "none":
        return images
    ops = dc_aug_param["strategy"].split("_")
    g = _DC_GENERATOR
    n, c, h, w = images.shape
    out = images.clone()
    mean = images.mean(dim=(0, 2, 3), keepdim=True)
    choice = torch.randint(len(ops), (n,), generator=g)
    for i in range(n):
        op, img = ops[int(choice[i])], out[i:i + 1]
        if op == "crop":
            k = int(dc_aug_param["crop"])
            pad = mean.expand(1, c, h + 2 * k, w + 2 * k).clone()
            pad[:, :, k:k + h, k:k + w] = img
            r, s = (int(v) for v in torch.randint(2 * k, (2,), generator=g))
            out[i] = pad[0, :, r:r + h, s:s + w]
        elif op in ("scale", "rotate"):
            if op == "scale":
                sc = float(dc_aug_param["scale"])
                fx, fy = (1 + sc * (2 * torch.rand(2, generator=g) - 1)).tolist()
                theta = torch.tensor([[1 / fx, 0, 0], [0, 1 / fy, 0]], dtype=images.dtype)
            else:
                rot = int(dc_aug_param["rotate"])
                a = float(torch.randint(-rot, rot, (1,), generator=g)) * np.pi / 180
                theta = torch.tensor([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0]], dtype=images.dtype)
            grid = F.affine_grid(theta.unsqueeze(0).to(images.device), [1, c, h, w], align_corners=False)
            filled = F.grid_sample(img - mean, grid, align_corners=False) + mean
            out[i] = filled[0]
        elif op == "noise":
            out[i] = img[0] + float(dc_aug_param["noise"]) * torch.randn(img.shape[1:], generator=g).to(images.device)
    return out


def get_daparam(dataset: str, model: str, model_eval: str, ipc: int) -> dict:
    """DC augmentation parameters: crop 4, scale 0.2, rotate 45, noise 0.001; strategy 'crop_scale_rotate'
    for MNIST, 'crop_noise' for a ConvNetBN evaluation model, 'none' otherwise."""
    param = {"crop": 4, "scale": 0.2, "rotate": 45, "noise": 0.001, "strategy": "none"}
    if dataset == "MNIST":
        param["strategy"] = "crop_scale_rotate"
    if model_eval in ("ConvNetBN",):
        param["strategy"] = "crop_noise"
    return param


_EVAL_POOLS = {
    "M": ["MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"],
    "W": ["ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"],
    "D": ["ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"],
    "A": ["ConvNetAS", "ConvNetAR", "ConvNetAL"],
    "P": ["ConvNetNP", "ConvNetMP", "ConvNetAP"],
    "N": ["ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"],
}


def get_eval_pool(eval_mode: str, model: str, model_eval: str) -> List[str]:
    """Models to evaluate on: a named pool ('M', 'W', 'D', 'A', 'P', 'N'), 'S' (``model`` without its
    'BN' suffix) or otherwise ``[model_eval]``."""
    if eval_mode in _EVAL_POOLS:
        return list(_EVAL_POOLS[eval_mode])
    if eval_mode == "S":
        return [model[:model.index("BN")]] if "BN" in model else [model]
    return [model_eval]


def epoch(mode: str, dataloader, net: nn.Module, optimizer, criterion, args, aug: bool):
    """One pass over ``dataloader`` ('train': with optimiser steps; else evaluation); with ``aug``,
    ``DiffAugment`` (``args.dsa``) or :func:`augment`. Returns (mean loss, accuracy in [0, 1])."""
    loss_sum, correct, count = 0.0, 0, 0
    net = net.to(args.device)
    net.train(mode == "train")
    for datum in dataloader:
        img = datum[0].float().to(args.device)
        if aug:
            img = (DiffAugment(img, args.dsa_strategy, param=args.dsa_param) if args.dsa
                   else augment(img, args.dc_aug_param, device=args.device))
        lab = datum[1].long().to(args.device)
        out = net(img)
        loss = criterion(out, lab)
        loss_sum += float(loss.detach()) * lab.shape[0]
        correct += int((out.argmax(-1) == lab).sum())
        count += lab.shape[0]
        if mode == "train":
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return loss_sum / count, correct / count


def evaluate_synset(it_eval: int, net: nn.Module, images_train: torch.Tensor, labels_train: torch.Tensor,
                    testloader, args):
    """Train ``net`` on (``images_train`` [N, C, H, W], ``labels_train`` [N]) for ``args.epoch_eval_train``
    epochs with fastdd's DM-protocol loop (lr ``args.lr_net``, batch ``args.batch_train``, DSA when
    ``args.dsa``) and test it on ``testloader``. Returns ``(net, acc_train, acc_test)`` (fractions)."""
    from ..evaluate import EvalConfig, StackedModels, accuracy_stacked, epoch_batches, epoch_learning_rates

    device = torch.device(args.device)
    net = net.to(device)
    x, y = images_train.detach().float().to(device), labels_train.detach().long().to(device)
    cfg = EvalConfig(epochs=int(args.epoch_eval_train), lr=float(args.lr_net), batch_size=int(args.batch_train))
    schedule = epoch_learning_rates(cfg)
    generator = torch.Generator(device=device).manual_seed(int(it_eval))
    stacked = StackedModels([net], vectorise=False)
    dsa = DSA(args.dsa_strategy, args.dsa_param.dsa_params()) if getattr(args, "dsa", False) else None
    start = time.time()
    opt, lr_prev = None, None
    train_acc = 0.0
    for lr in schedule:
        if lr != lr_prev:
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            lr_prev = lr
        net.train()
        correct = 0
        for idx in epoch_batches(1, x.shape[0], cfg.batch_size, generator, device):
            xb, yb = x[idx[0]], y[idx[0]]
            if dsa is not None:
                xb = dsa.per_sample(xb, generator)
            elif getattr(args, "dc_aug_param", None):
                xb = augment(xb, args.dc_aug_param, device)
            out = net(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((out.argmax(-1) == yb).sum())
        train_acc = correct / x.shape[0]
    test = testloader.dataset
    if isinstance(test, TensorDataset):
        tx, ty = test.images, test.labels
    else:
        batches = list(testloader)
        tx, ty = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    acc_test = float(accuracy_stacked(stacked, tx.float().to(device), ty.long().to(device), 1000)[0])
    print(f"{get_time()} Evaluate_{it_eval:02d}: epoch = {cfg.epochs:04d} train time = {int(time.time() - start)} s "
          f"train acc = {train_acc:.4f}, test acc = {acc_test:.4f}")
    return net, train_acc, acc_test
