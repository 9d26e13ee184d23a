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

A lazily read image folder (:class:`~fastdd.data.LazyImageFolder`, ``--lazy``: ImageNet's 1.28 M training
images never sit in memory) trains with the same draws: each epoch's shuffle is drawn as for a tensor, the
batches of file indices are decoded by a ``DataLoader`` (``workers`` processes, in order), and the crop / flip
is drawn in the main process per batch, so the weights equal those of the in-memory run of the same pixels
(the ``pil`` decoder reproduces the in-memory reader). ``train_subset`` draws the same rows
(:meth:`LazyImageFolder.sample_indices` is :class:`~fastdd.data.ClassSampler`'s draw), and a lazy test split
is streamed for the final accuracy.
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


def _train_step(net, optimizer, x: torch.Tensor, y: torch.Tensor, cfg: SqueezeConfig,
                generator: torch.Generator) -> float:
    """Augment one batch x [B, C, H, W] (draws from ``generator``), one SGD step on CE; returns the loss."""
    if cfg.crop_padding or cfg.flip:
        x = random_crop_flip(x, generator, padding=cfg.crop_padding, flip=cfg.flip)
    loss = F.cross_entropy(net(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_epoch(net, optimizer, images: torch.Tensor, labels: torch.Tensor, cfg: SqueezeConfig,
                generator: torch.Generator) -> float:
    """One shuffled pass over images [N, C, H, W] / labels [N]; returns the mean mini-batch loss."""
    n = images.shape[0]
    order = torch.randperm(n, generator=generator, device=generator.device).to(images.device)
    net.train()
    losses = [_train_step(net, optimizer, images[idx], labels[idx], cfg, generator)
              for idx in order.split(cfg.batch_size)]
    return sum(losses) / max(len(losses), 1)


def train_epoch_lazy(net, optimizer, dataset, rows: torch.Tensor, cfg: SqueezeConfig, generator: torch.Generator,
                     device, workers: int = 0) -> float:
    """:func:`train_epoch` over the rows [n] (int64 indices) of a lazily read ``dataset``: the same shuffle and
    augmentation draws, each batch's files decoded by a ``DataLoader`` with ``workers`` processes."""
    from torch.utils.data import DataLoader

    order = torch.randperm(rows.numel(), generator=generator, device=generator.device).cpu()
    batches = [rows[idx].tolist() for idx in order.split(cfg.batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda")
    net.train()
    losses = [_train_step(net, optimizer, x.to(device, non_blocking=True), y.to(device), cfg, generator)
              for x, y in loader]
    return sum(losses) / max(len(losses), 1)


@torch.no_grad()
def accuracy(net, test, device, batch_size: int = 500, workers: int = 0) -> float:
    """Top-1 accuracy (fraction) of ``net`` in eval mode on ``test`` (in memory, or a lazy split streamed
    through a ``DataLoader`` with ``workers`` processes)."""
    from .data import is_lazy
    from .data.lazy import make_loader

    net.eval()
    if is_lazy(test):
        batches = make_loader(test, batch_size, workers, device)
    else:
        batches = zip(test.images.split(batch_size), test.labels.split(batch_size))
    hits = 0
    for x, y in batches:
        hits += int((net(x.to(device)).argmax(1) == y.to(device)).sum())
    return hits / len(test)


def check_resume(out_dir, train: ImageDataset, cfg: SqueezeConfig) -> None:
    """Refuse (ValueError) to resume the squeeze in ``out_dir`` with another dataset or recipe (``epochs``
    may grow)."""
    check_run_meta(Path(out_dir) / TEACHER_META, _meta(train, cfg, 0, None), what="squeeze recipe", grows="epochs")


@reuse_freed_memory()
def squeeze(train, cfg: SqueezeConfig, out_dir, *, test=None, device="cpu", resume: bool = False,
            progress: bool = True, on_epoch: Optional[Callable[[int], None]] = None, workers: int = 0) -> Path:
    """Train the teacher into ``out_dir`` (module docstring); returns the directory.

    ``train`` / ``test``: :class:`~fastdd.data.ImageDataset` or :class:`~fastdd.data.LazyImageFolder`
    (``workers`` DataLoader processes decode a lazy one). ``test``: if given, the final test accuracy is
    recorded in ``teacher.json``. ``on_epoch(epochs_done)`` is called after each epoch's checkpoint (tests
    use it to interrupt a run)."""
    from .data import is_lazy

    check_positive_int("workers", workers, minimum=0)
    cfg.validate()
    device = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        check_resume(out, train, cfg)
    lazy = is_lazy(train)
    data = train
    if lazy:  # the rows to train on; the same draw as stratified_subset
        rows = torch.arange(len(train)) if not cfg.train_subset else train.sample_indices(
            cfg.train_subset // train.num_classes, torch.Generator().manual_seed(cfg.seed)).reshape(-1)
    else:
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
        if lazy:
            loss = train_epoch_lazy(net, optimizer, train, rows, cfg, g, device, workers)
        else:
            loss = train_epoch(net, optimizer, data.images, data.labels, cfg, g)
        epoch += 1
        save_atomic({"epoch": epoch, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "generator": g.get_state()}, state_path)
        if progress:
            print(f"[squeeze] {cfg.model} epoch {epoch}/{cfg.epochs} loss {loss:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        if on_epoch is not None:
            on_epoch(epoch)
    acc = accuracy(net, test, device, workers=workers) if test is not None else None
    save_atomic({k: v.detach().cpu() for k, v in net.state_dict().items()}, out / TEACHER_FILE)
    atomic_write(out / TEACHER_META, lambda tmp: Path(tmp).write_text(json.dumps(_meta(train, cfg, epoch, acc),
                                                                                 indent=2) + "\n"))
    if state_path.exists():
        state_path.unlink()
    return out
