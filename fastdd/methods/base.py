"""Shared machinery of the distillation methods.

A :class:`Method` owns the synthetic set (images [K*IPC, C, H, W] in the dataset's normalised space,
class-major labels [K*IPC]), the optimiser over it, one explicit ``torch.Generator`` from which every
random draw of the run is taken, and the iteration counter. Its whole state round-trips through
:meth:`Method.state_dict` / :meth:`Method.load_state_dict`, so a run checkpointed at iteration k and
resumed continues bit-for-bit like an uninterrupted one (on a deterministic device).

Subclasses implement :meth:`Method.step` (one iteration, returns the loss) and register themselves
with :func:`fastdd.methods.registry.register`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..data import ClassSampler, ImageDataset
from ..validation import check_positive_int, check_tensor


@dataclass
class MethodConfig:
    """Options every method shares (field names double as CLI flags: ``batch_real`` -> ``--batch-real``)."""

    ipc: int = 10  # synthetic images per class
    iterations: int = 1000  # outer iterations of the run
    seed: int = 0  # seeds the run's single torch.Generator
    model: str = "ConvNet"  # embedding network (see fastdd.models.model_names())
    init: str = "real"  # "real": random real images of each class; "noise": N(0, 1) in normalised space
    lr_img: float = 1.0  # SGD learning rate on the synthetic pixels
    momentum_img: float = 0.5  # SGD momentum on the synthetic pixels
    batch_real: int = 256  # real images per class per iteration
    dsa: bool = True  # differentiable siamese augmentation during matching
    dsa_strategy: str = ""  # "" picks the dataset default (fastdd.augment.dsa_strategy_for)

    def validate(self) -> None:
        check_positive_int("ipc", self.ipc)
        check_positive_int("iterations", self.iterations, minimum=0)
        check_positive_int("batch_real", self.batch_real)
        if self.init not in ("real", "noise"):
            raise ValueError(f"init: expected 'real' or 'noise', got {self.init!r}")
        if not self.lr_img > 0:
            raise ValueError(f"lr_img: must be > 0, got {self.lr_img}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Method:
    """Base class of a distillation method (see module docstring)."""

    name: str = "base"
    config_cls = MethodConfig

    def __init__(self, config: MethodConfig, dataset: ImageDataset, device: torch.device | str = "cpu"):
        config.validate()
        check_tensor("dataset.images", dataset.images, ndim=4, finite=True, nonempty=True)
        self.config = config
        self.device = torch.device(device)
        self.dataset = dataset.to(self.device)
        self.num_classes = dataset.num_classes
        counts = self.dataset.class_counts()
        for option, wanted in (("ipc", config.ipc), ("batch_real", config.batch_real)):
            smallest = int(counts.min())
            if wanted > smallest:
                cls = int(counts.argmin())
                raise ValueError(
                    f"{option}={wanted} is larger than class {cls} of {dataset.name}, which has only "
                    f"{smallest} images"
                )
        self.sampler = ClassSampler(self.dataset.images, self.dataset.labels, self.num_classes)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.iteration = 0
        self.labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(config.ipc)
        self.init_indices: Optional[torch.Tensor] = None
        self.images = self._initial_images()
        self.images.requires_grad_(True)
        self.optimizer = torch.optim.SGD([self.images], lr=config.lr_img, momentum=config.momentum_img)
        self.last_loss = float("nan")

    # ----------------------------------------------------------------------------------- set-up
    def _initial_images(self) -> torch.Tensor:
        """Initial synthetic set [K*IPC, C, H, W]: real images (recording their indices) or noise."""
        cfg = self.config
        if cfg.init == "real":
            idx = self.sampler.sample_indices(cfg.ipc, self.generator)  # [K, IPC]
            self.init_indices = idx.reshape(-1).clone()
            return self.dataset.images[self.init_indices].clone()
        shape = (self.num_classes * cfg.ipc, *self.dataset.images.shape[1:])
        return torch.randn(shape, generator=self.generator, device=self.device)

    # ----------------------------------------------------------------------------------- one step
    def step(self) -> float:
        """Run one outer iteration (update ``self.images``) and return its loss."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: images, optimiser, generator, iteration, config."""
        return {
            "method": self.name,
            "config": self.config.to_dict(),
            "iteration": self.iteration,
            "images": self.images.detach().cpu(),
            "labels": self.labels.cpu(),
            "init_indices": None if self.init_indices is None else self.init_indices.cpu(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "last_loss": self.last_loss,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"checkpoint: written by method {state.get('method')!r}, not {self.name!r}")
        saved = dict(state["config"])
        mine = self.config.to_dict()
        differing = sorted(k for k in mine if k != "iterations" and saved.get(k) != mine[k])
        if differing:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {mine[k]!r}" for k in differing)
            raise ValueError(f"checkpoint: configuration differs from this run ({detail})")
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])
        idx = state.get("init_indices")
        self.init_indices = None if idx is None else idx.to(self.device)
        self.last_loss = float(state.get("last_loss", float("nan")))

    # ----------------------------------------------------------------------------------- loop
    def fit(
        self,
        iterations: Optional[int] = None,
        *,
        checkpoint: Optional[Callable[["Method"], None]] = None,
        checkpoint_every: int = 0,
        progress: bool = True,
        log_every: int = 0,
    ) -> "Method":
        """Iterate until ``iterations`` (default: ``config.iterations``) have been done in total.

        ``checkpoint(self)`` is called every ``checkpoint_every`` iterations and at the end.
        """
        total = self.config.iterations if iterations is None else iterations
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.iteration, disable=not progress, desc=f"{self.name}", unit="it")
        start = time.perf_counter()
        try:
            while self.iteration < total:
                self.last_loss = self.step()
                if not math.isfinite(self.last_loss):
                    raise FloatingPointError(
                        f"{self.name}: the loss became {self.last_loss} at iteration {self.iteration + 1}; "
                        f"the synthetic images diverged (try a smaller lr_img, currently {self.config.lr_img})")
                self.iteration += 1
                bar.update(1)
                bar.set_postfix(loss=f"{self.last_loss / self.num_classes:.4f}")
                if log_every and self.iteration % log_every == 0 and not progress:
                    print(f"[{self.name}] iteration {self.iteration}/{total} loss/class "
                          f"{self.last_loss / self.num_classes:.5f}", flush=True)
                if checkpoint is not None and checkpoint_every and self.iteration % checkpoint_every == 0:
                    checkpoint(self)
        finally:
            bar.close()
        self.elapsed = time.perf_counter() - start
        if checkpoint is not None:
            checkpoint(self)
        return self

    # ----------------------------------------------------------------------------------- result
    def synthetic_set(self) -> dict:
        """The distilled set as a plain tensor dict (CPU): images, labels and, if any, init_indices."""
        out = {"images": self.images.detach().float().cpu().contiguous(), "labels": self.labels.cpu()}
        if self.init_indices is not None:
            out["init_indices"] = self.init_indices.cpu()
        return out
