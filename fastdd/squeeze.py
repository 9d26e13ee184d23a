"""SRe2L "squeeze": train a BatchNorm teacher on the real training set, resumable (``fastdd squeeze``).

Recipe (spec ``lowrank_dwa_theory.md`` §2.1, the CIFAR-100 squeeze script, the default preset): SGD
lr 0.1, momentum 0.9, weight decay 5e-4, cosine schedule per epoch to 0 (lr_e = 0.5 lr (1 + cos(pi e /
E))), batch 128, per-sample RandomCrop(H x W, padding 4) + horizontal flip, cross-entropy. The
spec's run is 200 epochs of the small-image ResNet-18 (``TVResNet18S``); ``ConvNetBN`` is the quick
teacher. The last partial batch of an epoch is kept.

Output directory ``DIR``::

    teacher.pt          plain state dict of the trained network (torchvision layout for TVResNet*)
    teacher.json        model, channels, num_classes, image_size, dataset + fingerprint, recipe,
                        epochs done, test accuracy
    squeeze_state.pt    (while running) atomic per-epoch checkpoint: model, optimiser, generator, epoch

Randomness: one ``torch.Generator`` seeded with ``seed`` draws the initialisation, the shuffles and the
augmentation, so a run killed after any epoch and resumed gives bit-identical weights (deterministic device).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .allocator import reuse_freed_memory
from .checkpoint import atomic_write, check_run_meta, dataset_fingerprint, save_atomic
from .checkpoint import load as load_checkpoint
from .crops import random_crop_flip
from .data import ImageDataset, stratified_subset
from .models import get_model
from .teacher import TEACHER_FILE, TEACHER_META
from .validation import check_positive_int

STATE_FILE = "squeeze_state.pt"


@dataclass
class SqueezeConfig:
    """Teacher training options (defaults: the spec's CIFAR-100 squeeze recipe, at a small epoch count)."""

    model: str = "ConvNetBN"  # BatchNorm network: ConvNetBN (quick), TVResNet18S (the spec's), ResNet18BN
    epochs: int = 20  # training epochs (the spec's CIFAR-100 teacher: 200)
    lr: float = 0.1  # SGD learning rate, cosine-annealed per epoch to 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    crop_padding: int = 4  # RandomCrop padding (0: no crop)
    flip: bool = True  # random horizontal flip
    train_subset: int = 0  # 0: the whole training set; N: a stratified random subset of N images
    seed: int = 0  # seeds the run's single generator (init, shuffles, augmentation)

    def validate(self) -> None:
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("crop_padding", self.crop_padding, minimum=0)
        check_positive_int("train_subset", self.train_subset, minimum=0)
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        for name in ("momentum", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


def cosine_lr(base: float, step: int, total: int) -> float:
    """``0.5 * base * (1 + cos(pi * step / total))``: the SRe2L cosine schedule without warm-up."""
    return 0.5 * base * (1.0 + math.cos(math.pi * step / total))


def _meta(train: ImageDataset, cfg: SqueezeConfig, epochs_done: int, accuracy: Optional[float]) -> dict:
    return {"model": cfg.model, "channels": train.channels, "num_classes": train.num_classes,
            "image_size": list(train.image_size), "dataset": train.name, "fingerprint": dataset_fingerprint(train),
            "mean": list(train.mean), "std": list(train.std), "config": dataclasses.asdict(cfg),
            "epochs_done": epochs_done, "test_accuracy": accuracy}


def train_epoch(net, optimizer, images: torch.Tensor, labels: torch.Tensor, cfg: SqueezeConfig,
                generator: torch.Generator) -> float:
    """One shuffled pass over images [N, C, H, W] / labels [N]; returns the mean mini-batch loss."""
    n = images.shape[0]
    order = torch.randperm(n, generator=generator, device=generator.device).to(images.device)
    total, steps = 0.0, 0
    net.train()
    for start in range(0, n, cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        x = images[idx]
        if cfg.crop_padding or cfg.flip:
            x = random_crop_flip(x, generator, padding=cfg.crop_padding, flip=cfg.flip)
        loss = F.cross_entropy(net(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        steps += 1
    return total / max(steps, 1)


@torch.no_grad()
def accuracy(net, test: ImageDataset, device, batch_size: int = 500) -> float:
    """Top-1 accuracy (fraction) of ``net`` in eval mode on ``test``."""
    net.eval()
    hits = 0
    for start in range(0, len(test), batch_size):
        x = test.images[start:start + batch_size].to(device)
        hits += int((net(x).argmax(1) == test.labels[start:start + batch_size].to(device)).sum())
    return hits / len(test)


def check_resume(out_dir, train: ImageDataset, cfg: SqueezeConfig) -> None:
    """Refuse (ValueError) to resume the squeeze in ``out_dir`` with another dataset or recipe (``epochs``
    may grow)."""
    check_run_meta(Path(out_dir) / TEACHER_META, _meta(train, cfg, 0, None), what="squeeze recipe", grows="epochs")


@reuse_freed_memory()
def squeeze(train: ImageDataset, cfg: SqueezeConfig, out_dir, *, test: Optional[ImageDataset] = None,
            device="cpu", resume: bool = False, progress: bool = True,
            on_epoch: Optional[Callable[[int], None]] = None) -> Path:
    """Train the teacher into ``out_dir`` (module docstring); returns the directory.

    ``test``: if given, the final test accuracy is recorded in ``teacher.json``. ``on_epoch(epochs_done)``
    is called after each epoch's checkpoint (tests use it to interrupt a run)."""
    cfg.validate()
    device = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        check_resume(out, train, cfg)
    data = train
    if cfg.train_subset:
        data = stratified_subset(train, cfg.train_subset // train.num_classes,
                                 torch.Generator().manual_seed(cfg.seed))
    data = data.to(device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    net = get_model(cfg.model, data.channels, data.num_classes, data.image_size, generator=g).to(device)
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        raise ValueError(f"model: {cfg.model} has no BatchNorm layer; a squeeze teacher needs one (ConvNetBN, "
                         "ResNet18BN, TVResNet18S, ...)")
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    epoch = 0
    state_path = out / STATE_FILE
    if resume and state_path.exists():
        st = load_checkpoint(state_path)
        net.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        g.set_state(st["generator"])
        epoch = int(st["epoch"])
    elif resume and (out / TEACHER_FILE).exists():
        saved = json.loads((out / TEACHER_META).read_text())
        if int(saved.get("epochs_done", 0)) >= cfg.epochs:
            return out  # already finished
    atomic_write(out / TEACHER_META, lambda tmp: Path(tmp).write_text(json.dumps(_meta(train, cfg, epoch, None),
                                                                                 indent=2) + "\n"))
    start = time.perf_counter()
    while epoch < cfg.epochs:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.lr, epoch, cfg.epochs)
        loss = train_epoch(net, optimizer, data.images, data.labels, cfg, g)
        epoch += 1
        save_atomic({"epoch": epoch, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "generator": g.get_state()}, state_path)
        if progress:
            print(f"[squeeze] {cfg.model} epoch {epoch}/{cfg.epochs} loss {loss:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        if on_epoch is not None:
            on_epoch(epoch)
    acc = accuracy(net, test, device) if test is not None else None
    save_atomic({k: v.detach().cpu() for k, v in net.state_dict().items()}, out / TEACHER_FILE)
    atomic_write(out / TEACHER_META, lambda tmp: Path(tmp).write_text(json.dumps(_meta(train, cfg, epoch, acc),
                                                                                 indent=2) + "\n"))
    if state_path.exists():
        state_path.unlink()
    return out
