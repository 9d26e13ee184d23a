"""Expert pre-training for DANCE (spec ``dm_dance.md`` §2.1), resumable.

K networks are trained on the real training set, one after the other, with the DANCE/IDC recipe: SGD
lr 0.01, momentum 0.9, weight decay 5e-4, batch 64, MultiStepLR (gamma 0.2) at 2/3 and 5/6 of the
epochs; every mini-batch gets per-sample DSA ``color_crop`` (IDC composition: color always, then crop)
and then CutMix with probability 0.5 and a Beta(1, 1) ratio. The last partial batch of an epoch is kept.

Output directory ``DIR``::

    premodel{i}_init.pt      state dict (plain ``torch.save``) of model i before training
    premodel{i}_trained.pt   state dict of model i after the last epoch
    experts.json             dataset, model, shapes, the pre-training config, number of finished models
    pretrain_state.pt        (while running) the atomic per-epoch checkpoint of the model in progress

Randomness: model i uses its own ``torch.Generator`` seeded with ``seed * 1_000_003 + i`` for its
initialisation, shuffling, augmentation and CutMix, so the experts do not depend on how many were trained
before, and a run killed at any point and resumed (``resume=True``) gives bit-identical weights (on a
deterministic device): the checkpoint holds model, optimiser and generator state after each epoch.

``train_subset = N`` trains on a class-balanced subset (the first ``N // num_classes`` images of every
class in dataset order) for small CPU budgets.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from .checkpoint import atomic_write, check_run_meta, save_atomic
from .checkpoint import load as load_checkpoint
from .data import ClassSampler, ImageDataset
from .idc import IDCAugment, cutmix, cutmix_loss, multistep_lr
from .models import get_model
from .validation import check_positive_int

STATE_FILE = "pretrain_state.pt"
META_FILE = "experts.json"


def init_file(i: int) -> str:
    return f"premodel{i}_init.pt"


def trained_file(i: int) -> str:
    return f"premodel{i}_trained.pt"


@dataclass
class PretrainConfig:
    """Expert pre-training options (defaults: the DANCE reproduce settings for the small datasets)."""

    models: int = 20
    epochs: int = 60
    model: str = "ConvNet"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gamma: float = 0.2
    batch_size: int = 64
    aug_strategy: str = "color_crop"
    mix_p: float = 0.5
    train_subset: int = 0  # 0: the whole training set; N: a class-balanced subset of N images
    seed: int = 0

    def validate(self) -> None:
        check_positive_int("models", self.models)
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("train_subset", self.train_subset, minimum=0)
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0.0 <= self.mix_p <= 1.0:
            raise ValueError(f"mix_p: must lie in [0, 1], got {self.mix_p}")
        for name in ("momentum", "weight_decay", "gamma"):
            value = getattr(self, name, None)
            if value is not None and not value >= 0:
                raise ValueError(f"{name}: must be >= 0, got {value}")


def balanced_subset(ds: ImageDataset, n: int) -> ImageDataset:
    """The first ``n // num_classes`` images of every class (dataset order)."""
    per_class = n // ds.num_classes
    if per_class < 1:
        raise ValueError(f"train_subset: {n} is smaller than the number of classes ({ds.num_classes})")
    idx = ClassSampler(ds.images, ds.labels, ds.num_classes).first_indices(per_class).reshape(-1)
    return dataclasses.replace(ds, images=ds.images[idx], labels=ds.labels[idx])


def model_generator(seed: int, i: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)


def train_epoch(net, optimizer, images, labels, cfg: PretrainConfig, aug: IDCAugment, generator: torch.Generator) -> float:
    """One pass over (images [N, C, H, W], labels [N]) in random order; returns the mean batch loss."""
    n = images.shape[0]
    order = torch.rand(n, generator=generator, device=generator.device).argsort().to(images.device)
    total, steps = 0.0, 0
    for start in range(0, n, cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        x, y = images[idx], labels[idx]
        x = aug.per_sample(x, generator)
        x, ya, yb, lam = cutmix(x.unsqueeze(0), y.unsqueeze(0), generator, cfg.mix_p)
        loss = cutmix_loss(net(x[0]).unsqueeze(0), ya, yb, lam)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        steps += 1
    return total / max(steps, 1)


def _meta(train: ImageDataset, cfg: PretrainConfig, done: int) -> dict:
    from .checkpoint import dataset_fingerprint

    return {"dataset": train.name, "fingerprint": dataset_fingerprint(train), "num_classes": train.num_classes, "channels": train.channels,
            "image_size": list(train.image_size), "model": cfg.model, "config": dataclasses.asdict(cfg),
            "finished_models": done}


def pretrain_experts(train: ImageDataset, cfg: PretrainConfig, out_dir, *, device="cpu", resume: bool = False,
                     progress: bool = True, on_epoch: Optional[Callable[[int, int], None]] = None) -> Path:
    """Train ``cfg.models`` experts into ``out_dir`` (see module docstring); returns the directory.

    ``on_epoch(model_index, epochs_done)`` is called after each epoch's checkpoint (tests use it to
    interrupt a run). Without ``resume`` an existing expert directory is refused.
    """
    cfg.validate()
    out = Path(out_dir)
    device = torch.device(device)
    meta_path = out / META_FILE
    if meta_path.exists() and not resume:
        raise FileExistsError(f"--out: {out} already holds experts ({META_FILE}); pass --resume to continue")
    if resume and meta_path.exists():
        saved = json.loads(meta_path.read_text())["config"]
        mine = dataclasses.asdict(cfg)
        differing = sorted(k for k in mine if k != "models" and saved.get(k) != mine[k])
        if differing:
            raise ValueError("--resume: pre-training configuration differs from the one in "
                             f"{meta_path}: {', '.join(f'{k}: {saved.get(k)!r} vs {mine[k]!r}' for k in differing)}")
    out.mkdir(parents=True, exist_ok=True)
    data = balanced_subset(train, cfg.train_subset) if cfg.train_subset else train
    data = data.to(device)
    aug = IDCAugment(cfg.aug_strategy)
    done = sum(1 for i in range(cfg.models) if (out / trained_file(i)).exists())
    atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(_meta(train, cfg, done), indent=2)))
    state_path = out / STATE_FILE
    for i in range(cfg.models):
        if (out / trained_file(i)).exists():
            continue
        g = model_generator(cfg.seed, i, device)
        net = get_model(cfg.model, data.channels, data.num_classes, data.image_size, generator=g).to(device)
        optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        epoch = 0
        if resume and state_path.exists():
            st = load_checkpoint(state_path)
            if st["model_index"] == i:
                net.load_state_dict(st["model"])
                optimizer.load_state_dict(st["optimizer"])
                g.set_state(st["generator"])
                epoch = int(st["epoch"])
        if epoch == 0:
            save_atomic({k: v.detach().cpu() for k, v in net.state_dict().items()}, out / init_file(i))
        start = time.perf_counter()
        net.train()
        while epoch < cfg.epochs:
            for group in optimizer.param_groups:
                group["lr"] = multistep_lr(cfg.lr, epoch, cfg.epochs, cfg.gamma)
            loss = train_epoch(net, optimizer, data.images, data.labels, cfg, aug, g)
            epoch += 1
            save_atomic({"model_index": i, "epoch": epoch, "model": net.state_dict(),
                         "optimizer": optimizer.state_dict(), "generator": g.get_state()}, state_path)
            if progress:
                print(f"[pretrain] expert {i + 1}/{cfg.models} epoch {epoch}/{cfg.epochs} loss {loss:.4f} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
            if on_epoch is not None:
                on_epoch(i, epoch)
        save_atomic({k: v.detach().cpu() for k, v in net.state_dict().items()}, out / trained_file(i))
        done += 1
        atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(_meta(train, cfg, done), indent=2)))
    if state_path.exists():
        state_path.unlink()
    return out


def check_resume(out_dir, train: ImageDataset, cfg: PretrainConfig) -> None:
    """Refuse (:class:`fastdd.errors.UsageError`) to resume the pre-training in ``out_dir`` with another
    dataset or configuration, or when its files are damaged."""
    from .errors import UsageError

    try:
        check_run_meta(Path(out_dir) / META_FILE, _meta(train, cfg, 0), what="pre-training configuration",
                       grows="models")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    state_path = Path(out_dir) / STATE_FILE
    if state_path.exists():
        load_checkpoint(state_path)  # a damaged state file: UsageError naming it


def available_experts(out_dir) -> int:
    """Number of consecutive finished experts (both files present) in ``out_dir``."""
    out = Path(out_dir)
    i = 0
    while (out / init_file(i)).exists() and (out / trained_file(i)).exists():
        i += 1
    return i


def load_experts(out_dir, count: int, device="cpu") -> Tuple[dict, List[Tuple[dict, dict]]]:
    """(metadata, [(init state dict, trained state dict)] for the first ``count`` experts) on ``device``."""
    out = Path(out_dir)
    if not out.is_dir() or not (out / META_FILE).exists():
        raise FileNotFoundError(f"experts: {out} is not an expert directory (no {META_FILE}); "
                                f"run `fastdd pretrain --out {out}` first")
    check_positive_int("num_premodel", count)
    have = available_experts(out)
    if count > have:
        raise ValueError(f"num_premodel={count} is larger than the {have} finished experts in {out}")
    meta = json.loads((out / META_FILE).read_text())
    pairs = []
    for i in range(count):
        pairs.append(tuple({k: v.to(device) for k, v in load_checkpoint(out / name).items()}
                           for name in (init_file(i), trained_file(i))))
    return meta, pairs
