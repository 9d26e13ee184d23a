"""Shared machinery of the distillation methods.

A :class:`Method` owns the synthetic set (images [K*n, C, H, W] in the dataset's normalised space,
class-major labels [K*n], n = :attr:`Method.images_per_class`), its parameterisation ``synth`` (an
``nn.Module`` whose ``forward()`` returns the images: plain pixels, or the low-rank factors of
:class:`fastdd.matchers.LowRankImages` when ``rank`` > 0), the optimiser over it, the add-ons switched
on by the config (:mod:`fastdd.methods.addons`), one explicit ``torch.Generator`` from which every
random draw of the run is taken, and the iteration counter.

Low-rank plugin (spec ``lowrank_dwa_theory.md`` 1.1-1.3): with ``rank = r`` every image channel is
``A [H, r] @ B [r, W]``; under the same storage budget as ``ipc`` plain images the method gets
``lowrank_ipc(ipc, H, W, r, rounding)`` images per class ("code": ``ipc * floor(HW / (r (H + W)))``, the
reference's; "readme": ``floor(ipc HW / (r (H + W)))``). ``init="real"`` projects that many real images
per class onto the rank-r manifold (truncated SVD); ``init="noise"`` draws A, B from N(0, 1) as the
reference does. The saved set then stores the factors, not the images. Its whole state round-trips through
:meth:`Method.state_dict` / :meth:`Method.load_state_dict`, so a run checkpointed at iteration k and
resumed continues bit-for-bit like an uninterrupted one (on a deterministic device).

Datasets: an in-memory :class:`~fastdd.data.ImageDataset` (moved to the device), or a
:class:`~fastdd.data.LazyImageFolder` (an image folder decoded on demand, left on the CPU) for a method that
reads real images only to initialise the set (:attr:`Method.needs_real_set` False: the SRe2L family). On a
lazy dataset the real-image initialisation decodes exactly the drawn files (the same indices as in memory),
the class-size checks use ``class_counts()`` and shapes come from ``(channels, *image_size)``; a method
that samples the real set at every iteration (DM family, DC/DSA) refuses it with a ValueError saying to
load it eagerly.

Subclasses implement :meth:`Method.step` (one iteration, returns the loss) and register themselves
with :func:`fastdd.methods.registry.register`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch

from ..allocator import reuse_freed_memory
from ..augment import DSA, dsa_strategy_for
from ..data import ClassSampler, ImageDataset, LazyImageFolder, is_lazy
from ..models import get_model
from ..plugins import config_classes, validate_plugins
from ..validation import check_labels, check_positive_int, check_tensor


@dataclass
class SharedOptions:
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


#: Config fields that choose how a run executes, not what it computes (the same values up to floating-point
#: rounding): a checkpoint resumes under other values of these (the total ``iterations`` may grow, ``compile``
#: ``batched_grads`` and the teacher's ``memory_format`` may differ, e.g. on a machine without a compiler).
EXECUTION_FIELDS = frozenset({"iterations", "compile", "batched_grads", "memory_format"})
#: Fields added after checkpoints were first written -> the value the earlier code used, for checkpoints that
#: lack them (recover drew symmetric roll offsets before ``roll_offsets`` existed).
LEGACY_DEFAULTS = {"roll_offsets": "symmetric"}


@dataclass
class MethodConfig(*reversed(config_classes()), SharedOptions):
    """:class:`SharedOptions` followed by the flat fields of every registered plugin config
    (:mod:`fastdd.plugins`: ``rank``, ``rank_rounding``, ``mim_*``), in that order."""

    def validate(self) -> None:
        check_positive_int("ipc", self.ipc)
        check_positive_int("iterations", self.iterations, minimum=0)
        check_positive_int("batch_real", self.batch_real)
        if self.init not in ("real", "noise"):
            raise ValueError(f"init: expected 'real' or 'noise', got {self.init!r}")
        if not self.lr_img > 0:
            raise ValueError(f"lr_img: must be > 0, got {self.lr_img}")
        validate_plugins(self)  # the plugins' own fields (rank*, mim_*)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class PixelImages(torch.nn.Module):
    """Plain parameterisation: the synthetic images themselves, one ``Parameter`` [N, C, H, W]."""

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.images = torch.nn.Parameter(images)

    def forward(self) -> torch.Tensor:
        """The images [N, C, H, W] (the parameter itself)."""
        return self.images

    def export(self) -> dict:
        """Tensors a saved set stores: ``{"images": [N, C, H, W]}`` (detached, CPU, float32)."""
        return {"images": self.images.detach().float().cpu().contiguous()}


class Method:
    """Base class of a distillation method (see module docstring)."""

    name: str = "base"
    config_cls = MethodConfig
    #: whether :meth:`step` samples real images of every class at every iteration (DM family, DC/DSA); such a
    #: method refuses a lazily read dataset. The SRe2L family reads real images only to initialise the set.
    needs_real_set: bool = True
    #: config fields a checkpoint may be resumed under other values of (:data:`EXECUTION_FIELDS`)
    execution_fields: frozenset = EXECUTION_FIELDS

    def __init__(self, config: MethodConfig, dataset: Union[ImageDataset, LazyImageFolder],
                 device: torch.device | str = "cpu"):
        config.validate()
        self.config = config
        self.device = torch.device(device)
        self.lazy = is_lazy(dataset)
        self.dataset = self._checked_dataset(dataset)
        self.num_classes = dataset.num_classes
        self.images_per_class = self._images_per_class()
        self._check_class_sizes(self.dataset.class_counts())
        # in memory: the on-device sampler; lazy: the dataset draws the same indices from its labels alone
        self.sampler = None if self.lazy else ClassSampler(self.dataset.images, self.dataset.labels, self.num_classes)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.iteration = 0
        self.labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(self.images_per_class)
        # validate once: the labels never change, so the per-iteration matchers run with validate=False
        # (no device->host sync in the step); the class-count check above guarantees every class on both sides
        check_labels("labels", self.labels, self.num_classes)
        self.init_indices: Optional[torch.Tensor] = None
        self.synth = self._initial_parameterisation().to(self.device)
        self.optimizer = torch.optim.SGD(self.synth.parameters(), lr=config.lr_img, momentum=config.momentum_img)
        self.last_loss = float("nan")
        from .addons import build_addons

        self.addons = build_addons(self)

    # ----------------------------------------------------------------------------------- set-up
    def _checked_dataset(self, dataset):
        """``dataset`` ready for the run: an in-memory set checked (finite [N, C, H, W]) and moved to the
        device; a lazy one (:class:`~fastdd.data.LazyImageFolder`, left on the CPU, decoded on demand) only
        if this method does not sample the whole real set at every iteration (:attr:`needs_real_set`)."""
        if not self.lazy:
            check_tensor("dataset.images", dataset.images, ndim=4, finite=True, nonempty=True)
            return dataset.to(self.device)
        if self.needs_real_set:
            raise ValueError(
                f"{self.name}: samples real images of every class at every iteration, so it needs the training set "
                f"in memory, but {dataset.name} {dataset.split} is read lazily (a LazyImageFolder of {len(dataset)} "
                f"files); load it eagerly: `--lazy off` on the command line, load_dataset(..., lazy=False) in Python")
        return dataset

    def _check_class_sizes(self, counts: torch.Tensor) -> None:
        """Refuse (ValueError) an empty class, and an ``ipc`` (real init) or ``batch_real`` larger than the
        smallest class. ``counts``: images per class, int64 [K] (``dataset.class_counts()``: no pixels read)."""
        cfg, name = self.config, self.dataset.name
        counts = counts.tolist()
        empty = [k for k, n in enumerate(counts) if n == 0]
        if empty:
            more = f" (and {len(empty) - 1} more: {empty[1:6]})" if len(empty) > 1 else ""
            raise ValueError(f"labels: class {empty[0]} of {name} has no images{more}; every class needs at least one")
        checks = [("batch_real", cfg.batch_real)]
        if cfg.init == "real":
            checks.insert(0, ("ipc" if cfg.rank == 0 else f"ipc (rank {cfg.rank}: {self.images_per_class} "
                              f"images per class)", self.images_per_class))
        smallest = min(counts)
        for option, wanted in checks:
            if wanted > smallest:
                raise ValueError(f"{option}={wanted} is larger than class {counts.index(smallest)} of {name}, which "
                                 f"has only {smallest} images")

    def _set_shape(self) -> Tuple[int, int, int, int]:
        """Shape of the synthetic set, ``(K*n, C, H, W)`` (from the dataset's metadata, no pixels read)."""
        c, (h, w) = self.dataset.channels, self.dataset.image_size
        return self.num_classes * self.images_per_class, c, h, w

    def _images_per_class(self) -> int:
        """Synthetic images per class: ``ipc``, or the low-rank plugin's count at the same storage."""
        cfg = self.config
        if cfg.rank == 0:
            return cfg.ipc
        from ..ops.lowrank import lowrank_ipc

        h, w = self.dataset.image_size
        return lowrank_ipc(cfg.ipc, h, w, cfg.rank, rounding=cfg.rank_rounding)

    def _initial_images(self) -> torch.Tensor:
        """Initial synthetic images [K*n, C, H, W]: real images (recording their indices) or N(0, 1) noise."""
        if self.config.init == "real":
            return self._initial_real_images()
        return torch.randn(self._set_shape(), generator=self.generator, device=self.device)

    def _initial_real_images(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Real-image initialisation: draws ``n`` distinct images of every class from the run's generator
        (all K*n indices, class-major, kept in :attr:`init_indices` [K*n]) and returns them as [K*n, C, H, W].
        ``rows`` (int64 [R], set rows): read only those images; the other rows are zero. A lazy dataset
        decodes exactly the files read; the draw is the same either way (``LazyImageFolder.sample_indices``
        equals ``ClassSampler.sample_indices`` on the same labels)."""
        n = self.images_per_class
        if self.lazy:
            idx = self.dataset.sample_indices(n, self.generator).to(self.device)  # [K, n], no file opened
        else:
            idx = self.sampler.sample_indices(n, self.generator)  # [K, n]
        self.init_indices = idx.reshape(-1).clone()
        if rows is None:
            return self._real_images(self.init_indices)
        out = torch.zeros(self._set_shape(), device=self.device)
        out[rows] = self._real_images(self.init_indices[rows])
        return out

    def _real_images(self, indices: torch.Tensor) -> torch.Tensor:
        """The dataset's images at ``indices`` (int64 [m]) as a new tensor [m, C, H, W] on the device; a lazy
        dataset decodes just those m files."""
        if self.lazy:
            return self.dataset.images_at(indices.cpu()).to(self.device)
        return self.dataset.images[indices].clone()

    def _initial_parameterisation(self) -> torch.nn.Module:
        """The module holding the learnable synthetic set: :class:`PixelImages`, or
        :class:`fastdd.matchers.LowRankImages` (projected real images or N(0, 1) factors) when ``rank`` > 0."""
        cfg = self.config
        if cfg.rank == 0:
            return PixelImages(self._initial_images())
        from ..matchers.lowrank import LowRankImages

        if cfg.init == "real":
            return LowRankImages.from_real(self._initial_images(), cfg.rank)
        c, (h, w) = self.dataset.channels, self.dataset.image_size
        return LowRankImages.from_noise(self.num_classes * self.images_per_class, c, h, w, cfg.rank,
                                        self.generator, device=self.device)

    def _network(self) -> torch.nn.Module:
        """A fresh ``config.model`` for the dataset, initialised from the run's generator, on the device,
        in train mode."""
        ds = self.dataset
        net = get_model(self.config.model, ds.channels, self.num_classes, ds.image_size,
                        generator=self.generator).to(self.device)
        net.train()
        return net

    def _augmentation(self) -> Optional[DSA]:
        """The matching augmentation: DSA with ``dsa_strategy`` (default: the dataset's), None if ``dsa`` is off."""
        cfg = self.config
        return DSA(cfg.dsa_strategy or dsa_strategy_for(self.dataset.name)) if cfg.dsa else None

    @property
    def images(self) -> torch.Tensor:
        """The current synthetic images [K*n, C, H, W], differentiable w.r.t. the parameterisation."""
        return self.synth()

    # ----------------------------------------------------------------------------------- add-ons
    @property
    def needs_taps(self) -> bool:
        """Whether some add-on needs the per-block feature maps (not only the embedding)."""
        return any(getattr(a, "needs_taps", False) for a in self.addons.values())

    def addon_loss(self, real_emb, real_taps, real_labels, syn_emb, syn_taps, syn_labels):
        """Sum of the switched-on add-ons' (weighted) losses, or ``None`` when there are none.
        Shapes: embeddings [N, F], taps lists of [N, C_l, H_l, W_l] (may be ``None`` if no add-on needs them)."""
        total = None
        for addon in self.addons.values():
            term = addon.loss(real_emb, real_taps, real_labels, syn_emb, syn_taps, syn_labels)
            total = term if total is None else total + term
        return total

    def addons_zero_grad(self) -> None:
        for addon in self.addons.values():
            addon.zero_grad()

    def addons_step(self) -> None:
        """Step the add-ons' own optimisers (call after ``backward``)."""
        for addon in self.addons.values():
            addon.step()

    def update(self, loss: torch.Tensor, addons: bool = True) -> float:
        """One optimiser step on ``loss`` (0-d): gradients of the synthetic parameterisation and, with
        ``addons``, of the add-ons' own parameters, then both steps. Returns the loss as a float."""
        self.optimizer.zero_grad(set_to_none=True)
        if addons:
            self.addons_zero_grad()
        loss.backward()
        self.optimizer.step()
        if addons:
            self.addons_step()
        return float(loss.detach())

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
            "synth": {k: v.detach().cpu() for k, v in self.synth.state_dict().items()},
            "labels": self.labels.cpu(),
            "init_indices": None if self.init_indices is None else self.init_indices.cpu(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "last_loss": self.last_loss,
            "addons": {name: addon.state_dict() for name, addon in self.addons.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"checkpoint: written by method {state.get('method')!r}, not {self.name!r}")
        mine = self.config.to_dict()
        saved = {**{k: v for k, v in LEGACY_DEFAULTS.items() if k in mine}, **dict(state["config"])}
        differing = sorted(k for k in mine if k not in self.execution_fields and saved.get(k) != mine[k])
        if differing:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {mine[k]!r}" for k in differing)
            raise ValueError(f"checkpoint: configuration differs from this run ({detail})")
        self.synth.load_state_dict({k: v.to(self.device) for k, v in state["synth"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
        saved_addons = state.get("addons", {})
        if sorted(saved_addons) != sorted(self.addons):
            raise ValueError(f"checkpoint: add-ons {sorted(saved_addons)} differ from this run's {sorted(self.addons)}")
        for name, addon in self.addons.items():
            addon.load_state_dict(saved_addons[name])
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])
        idx = state.get("init_indices")
        self.init_indices = None if idx is None else idx.to(self.device)
        self.last_loss = float(state.get("last_loss", float("nan")))

    # ----------------------------------------------------------------------------------- loop
    @reuse_freed_memory()
    def fit(
        self,
        iterations: Optional[int] = None,
        *,
        checkpoint: Optional[Callable[[Method], None]] = None,
        checkpoint_every: int = 0,
        progress: bool = True,
        log_every: int = 0,
    ) -> Method:
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
        """The distilled set as a plain tensor dict (CPU): ``images`` [N, C, H, W] (or, for the low-rank
        plugin, ``factor_a`` [N, C, H, r] and ``factor_b`` [N, C, r, W] instead, images = a @ b),
        ``labels`` [N] and, if any, ``init_indices`` [N]."""
        export = getattr(self.synth, "export", None) or self.synth.factors
        out = dict(export())
        out["labels"] = self.labels.cpu()
        if self.init_indices is not None:
            out["init_indices"] = self.init_indices.cpu()
        return out
