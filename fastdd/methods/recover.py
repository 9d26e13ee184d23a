"""The SRe2L "recover" loop shared by ``sre2l`` and ``dwa`` (spec ``lowrank_dwa_theory.md`` §2.1-2.3).

The synthetic set (K classes x ``ipc`` images, class-major) is synthesised in independent *units*: unit
u = (IPC index j, class batch b) holds image j of every class in batch b (``batch_classes`` consecutive
class ids), units ordered j-major as the reference's ``ipc_id`` loop. Each unit runs ``iterations``
steps against the frozen BatchNorm teacher (:mod:`fastdd.teacher`) with a fresh Adam(lr0, betas
(``adam_beta1``, ``adam_beta2``), eps 1e-8) whose rate follows lr_t = 0.5 lr0 (1 + cos(pi t / T)):

    x_aug = roll(flip(RRC(x)))          one crop / flip / roll drawn per step for the whole unit
    L     = CE(f_T(x_aug), y) + r_bn * sum_l m_l (||mu_l - RM_l|| + r_var ||var_l - RV_l||)

(BN term: :class:`fastdd.matchers.BNStatisticsLoss` over the fused ``bn_stat_loss`` op), then the pixels
are clamped per channel to the range that maps to [0, 1] after de-normalisation. The last iterate is
kept. Total steps of a run: units x iterations; ``--iterations`` is the per-unit T.

Hyper-parameters left at ``None`` come from a per-dataset preset (:attr:`RecoverConfig.presets`:
``cifar``, ``tiny``, ``imagenet``; ``preset="auto"`` picks ``tiny`` for tiny-imagenet, ``imagenet`` for
images of 128 px and more, ``cifar`` otherwise, which covers the 28 / 32 px datasets). The resolved
values are written into the run's config.

Subclasses add a hook at the start of each unit (:meth:`RecoverMethod.start_unit`; DWA perturbs the
teacher there). Randomness: the run's single generator draws the initial set, then every jitter.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional

import torch
import torch.nn.functional as F

from ..crops import RecoverJitter
from ..matchers import BNStatisticsLoss
from ..teacher import load_teacher
from .base import Method, MethodConfig

PRESET_NAMES = ("auto", "cifar", "tiny", "imagenet")


@dataclass
class RecoverConfig(MethodConfig):
    """SRe2L-family options; ``None`` means "from the dataset preset" (see the module docstring)."""

    teacher: str = ""  # squeeze directory or ARCH:PATH (resnet18:/resnet50:/resnet18s:/resnet50s:)
    preset: str = "auto"  # hyper-parameter preset: auto | cifar | tiny | imagenet
    iterations: Optional[int] = None  # synthesis steps per unit (IPC index x class batch)
    lr_img: Optional[float] = None  # Adam lr0 on the pixels (cosine to 0 within each unit)
    batch_classes: Optional[int] = None  # classes per synthesis batch (one image each)
    r_bn: Optional[float] = None  # weight of the BN-statistics term
    r_var: Optional[float] = None  # weight of the variance part of each BN term (DWA; SRe2L: 1)
    first_bn_multiplier: Optional[float] = None  # multiplier of the first BN layer's term
    crop: Optional[bool] = None  # random-resized crop + flip before the roll
    jitter: Optional[int] = None  # roll offsets uniform in {-J..J}
    min_scale: float = 0.08  # smallest crop area fraction
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    batch_real: int = 1  # unused by the SRe2L family (kept for the shared options)
    init: str = "noise"  # "noise": N(0, 1) in normalised space; "real": random real images

    #: preset name -> values of the ``None`` fields (set by each method's config class)
    presets: ClassVar[Dict[str, dict]] = {}

    def validate(self) -> None:
        """Check the options; fields still ``None`` are checked with the ``cifar`` preset's values."""
        if not self.teacher:
            raise ValueError("teacher: required (a `fastdd squeeze` directory or resnet18:PATH)")
        if self.preset not in PRESET_NAMES:
            raise ValueError(f"preset: expected one of {list(PRESET_NAMES)}, got {self.preset!r}")
        if any(getattr(self, f.name) is None for f in dataclasses.fields(self)):
            fill = {k: v for k, v in self.presets["cifar"].items() if getattr(self, k) is None}
            return dataclasses.replace(self, **fill).validate()
        if self.rank or self.mim_weight:
            raise ValueError("rank/mim_weight: the low-rank and MIM4DD plugins do not apply to the SRe2L family")
        super().validate()
        for name in ("batch_classes", "jitter"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (1 if name == "batch_classes" else 0):
                raise ValueError(f"{name}: must be an int >= {1 if name == 'batch_classes' else 0}, "
                                 f"got {getattr(self, name)!r}")
        for name in ("r_bn", "r_var", "first_bn_multiplier"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale: must lie in (0, 1], got {self.min_scale}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must lie in [0, 1), got {getattr(self, name)}")


def auto_preset(dataset) -> str:
    """The preset for a dataset: ``tiny`` for tiny-imagenet, ``imagenet`` from 128 px, else ``cifar``."""
    if "tiny" in dataset.name.lower():
        return "tiny"
    return "imagenet" if min(dataset.image_size) >= 128 else "cifar"


def resolve_config(config: RecoverConfig, dataset) -> RecoverConfig:
    """``config`` with every ``None`` field taken from its class's preset for the dataset."""
    name = auto_preset(dataset) if config.preset == "auto" else config.preset
    if name not in config.presets:
        raise ValueError(f"preset: expected one of {['auto', *config.presets]}, got {config.preset!r}")
    values = {k: v for k, v in config.presets[name].items() if getattr(config, k, None) is None}
    return dataclasses.replace(config, preset=name, **values)


class RecoverMethod(Method):
    """SRe2L-family synthesis (module docstring). Subclasses set ``config_cls`` (with its ``presets``)."""

    config_cls = RecoverConfig

    def __init__(self, config: RecoverConfig, dataset, device="cpu"):
        config = resolve_config(config, dataset)
        super().__init__(config, dataset, device)
        ds = self.dataset
        self.teacher, self.teacher_info = load_teacher(config.teacher, ds.channels, ds.num_classes, ds.image_size,
                                                       self.device)
        self.bn_loss = BNStatisticsLoss(self.teacher, config.first_bn_multiplier, config.r_var)
        self.jitter = RecoverJitter(crop=config.crop, jitter=config.jitter, min_scale=config.min_scale)
        self.class_batches = math.ceil(self.num_classes / config.batch_classes)
        self.units = config.ipc * self.class_batches
        mean = torch.tensor(ds.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(ds.std, device=self.device).view(1, -1, 1, 1)
        self.pixel_low, self.pixel_high = (0 - mean) / std, (1 - mean) / std  # [1, C, 1, 1]
        self.work: Optional[torch.nn.Parameter] = None
        self.adam: Optional[torch.optim.Adam] = None

    # ------------------------------------------------------------------------------------------- units
    @property
    def total_steps(self) -> int:
        """Steps of the whole run: units x iterations per unit."""
        return self.units * self.config.iterations

    def unit_rows(self, unit: int):
        """(IPC index j, class batch b, set rows [B_u], class labels [B_u]) of unit ``unit``."""
        j, b = divmod(unit, self.class_batches)
        bc = self.config.batch_classes
        classes = torch.arange(b * bc, min(self.num_classes, (b + 1) * bc), device=self.device)
        return j, b, classes * self.images_per_class + j, classes

    def start_unit(self, unit: int) -> None:
        """Begin unit ``unit``: its rows become the optimised tensor, with a fresh Adam."""
        _, _, rows, classes = self.unit_rows(unit)
        self.work = torch.nn.Parameter(self.synth.images.detach()[rows].clone())
        self.unit_labels = classes
        cfg = self.config
        self.adam = torch.optim.Adam([self.work], lr=cfg.lr_img, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8)

    def recover_loss(self, x: torch.Tensor, labels: torch.Tensor):
        """(total loss, CE, BN term) of images x [B, C, H, W] with labels [B], one jitter draw."""
        draw = self.jitter.draw(tuple(x.shape[-2:]), self.generator)
        logits = self.teacher(self.jitter.apply(x, draw))
        ce = F.cross_entropy(logits, labels)
        bn = self.bn_loss.loss()
        return ce + self.config.r_bn * bn, ce, bn

    def step(self) -> float:
        cfg = self.config
        unit, t = divmod(self.iteration, cfg.iterations)
        if t == 0 or self.work is None:
            if t == 0:
                self.start_unit(unit)
            else:  # resumed mid-unit: load_state_dict rebuilt the unit
                raise RuntimeError("recover: unit state missing after resume")
        for group in self.adam.param_groups:
            group["lr"] = 0.5 * cfg.lr_img * (1.0 + math.cos(math.pi * t / cfg.iterations))
        loss, _, _ = self.recover_loss(self.work, self.unit_labels)
        self.adam.zero_grad(set_to_none=True)
        loss.backward()
        self.adam.step()
        with torch.no_grad():
            self.work.copy_(torch.maximum(torch.minimum(self.work, self.pixel_high), self.pixel_low))
            _, _, rows, _ = self.unit_rows(unit)
            self.synth.images[rows] = self.work
        return float(loss.detach())

    def fit(self, iterations: Optional[int] = None, **kwargs) -> RecoverMethod:
        """Run until ``iterations`` steps in total (default: every unit, :attr:`total_steps`)."""
        return super().fit(self.total_steps if iterations is None else iterations, **kwargs)

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["adam"] = None if self.adam is None else self.adam.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        unit, t = divmod(self.iteration, self.config.iterations)
        if t and state.get("adam") is not None:  # resumed inside a unit: rebuild it and its Adam state
            self.start_unit_resumed(unit)
            self.adam.load_state_dict(state["adam"])

    def start_unit_resumed(self, unit: int) -> None:
        """Rebuild unit ``unit`` in the middle of its run (its rows already hold the current iterate)."""
        RecoverMethod.start_unit(self, unit)
