"""The SRe2L "recover" loop shared by ``sre2l`` and ``dwa`` (spec ``lowrank_dwa_theory.md`` §2.1-2.3).

The synthetic set (K classes x ``ipc`` images, class-major) is synthesised in independent *units*: unit
u = (IPC index j, class batch b) holds image j of every class in batch b (``batch_classes`` consecutive
class ids), units ordered j-major as the reference's ``ipc_id`` loop. Each unit runs ``iterations``
steps against the frozen BatchNorm teacher (:mod:`fastdd.teacher`) with a fresh Adam(lr0, betas
(``adam_beta1``, ``adam_beta2``), eps 1e-8) whose rate follows lr_t = 0.5 lr0 (1 + cos(pi t / T)):

    x_aug = roll(flip(RRC(x)))          one crop / flip / roll drawn per step for the whole unit
    L     = CE(f_T(x_aug), y) + r_bn * sum_l m_l (||mu_l - RM_l|| + r_var ||var_l - RV_l||)

(BN term: :class:`fastdd.matchers.BNStatisticsLoss` over the fused ``bn_stat_loss`` op; roll offsets
uniform on {-J..J} or {0..J}, ``roll_offsets``), then the pixels
are clamped per channel to the range that maps to [0, 1] after de-normalisation. The last iterate is
kept. Total steps of a run: units x iterations; ``--iterations`` is the per-unit T.

Hyper-parameters left at ``None`` come from a per-dataset preset (:attr:`RecoverConfig.presets`:
``cifar``, ``tiny``, ``imagenet``; ``preset="auto"`` picks ``tiny`` for tiny-imagenet, ``imagenet`` for
images of 128 px and more, ``cifar`` otherwise, which covers the 28 / 32 px datasets). The resolved
values are written into the run's config.

Roll offsets (``roll_offsets``, every preset): ``"symmetric"`` (default), o1, o2 uniform on {-J..J}, or
``"nonnegative"``, on {0..J}. The spec (§2.1) writes U{0..J}, and so do most released scripts: SRe2L's
ImageNet ``data_synthesis.py`` and ``recover_cifar.py`` and all three DWA ``distillation_*.py`` call
``random.randint(0, J)``; only SRe2L's ``recover_tiny.py`` calls ``random.randint(-J, J)``. The default stays
symmetric: it is centred (a one-sided roll shows the teacher the image moved by J/2 pixels on average,
while the saved image is the unmoved one), it keeps earlier sets and measurements reproducible, and on
Fashion-MNIST (DWA, IPC 10, 100 iterations, the ``tests/test_sre2l_fmnist.py`` budget, KD with one student)
it measured 45.5 % vs 37.4 % for nonnegative at seed 0 and 42.4 vs 42.6 % at seed 1 (initial real images:
35.3 and 41.6 %; two seeds, indicative only). ``--roll-offsets nonnegative`` reproduces the spec and those
scripts.

Subclasses add a hook at the start of each unit (:meth:`RecoverMethod.start_unit`; DWA perturbs the
teacher there).

Randomness is per unit, so that a unit's result depends only on (``seed``, unit index u) and not on which
process runs it or in which order (:func:`unit_seeds`): ``numpy.random.SeedSequence((seed mod 2**64, u))``
gives four 32-bit words; words 0-1 (high, low) seed the unit's *init* generator, which draws its N(0, 1)
initial images (``init="noise"``; every unit's are drawn when the method is built), words 2-3 seed its
*synthesis* generator, created at the unit's start, which draws every jitter of the unit (and DWA's
perturbation view). The run's own generator (``seed``) draws only the real-image initialisation
(``init="real"``: n distinct images per class for the whole set, the same on every process).

Sharding (:meth:`RecoverMethod.shard`, used by ``torchrun ... fastdd distill``): rank r of W runs the units
of the IPC indices j with j % W == r, in their usual order, and its iteration counter counts only its own
steps. Whole IPC indices go to one process because DWA's ``accumulate`` mode chains the class batches of an
IPC index through one perturbed teacher. As every unit has its own randomness, the shards put together
(:meth:`RecoverMethod.merge_shards`) equal the one-process set exactly (on a deterministic device). Built
with ``shard=(rank, world)`` (as ``fastdd distill`` does under torchrun), a real-image initialisation reads
only the shard's rows, so on a lazily read image folder each process decodes only its own initial images.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..compile import Compiled, check_compile_mode, should_compile
from ..crops import ROLL_OFFSETS, RecoverJitter
from ..matchers import BNStatisticsLoss
from ..teacher import load_teacher
from .base import EXECUTION_FIELDS, Method, MethodConfig

PRESET_NAMES = ("auto", "cifar", "tiny", "imagenet")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def teacher_memory_format(value: str, device) -> torch.memory_format:
    """The layout the teacher and its inputs run in. ``auto``: channels_last on a CPU, where oneDNN runs its
    convolutions without converting activations to its blocked layout and back (forward and backward of
    the recover step about 20 % faster, ``benchmarks/recover.py``), NCHW (contiguous) elsewhere until a GPU
    measurement says otherwise. The fused BN statistics read a channels_last map in place."""
    if value == "auto":
        value = "channels_last" if torch.device(device).type == "cpu" else "contiguous"
    return torch.channels_last if value == "channels_last" else torch.contiguous_format


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
    jitter: Optional[int] = None  # roll bound J
    roll_offsets: str = "symmetric"  # roll offsets uniform in {-J..J} (symmetric) or {0..J} (nonnegative: the spec)
    min_scale: float = 0.08  # smallest crop area fraction
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    batch_real: int = 1  # unused by the SRe2L family (kept for the shared options)
    init: str = "noise"  # "noise": N(0, 1) in normalised space; "real": random real images
    compile: str = "auto"  # torch.compile of the teacher loss (forward, CE, BN term): auto | on | off (fastdd.compile)
    memory_format: str = "auto"  # teacher layout: auto (channels_last on a CPU) | channels_last | contiguous

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
        if self.roll_offsets not in ROLL_OFFSETS:
            raise ValueError(f"roll_offsets: expected one of {list(ROLL_OFFSETS)}, got {self.roll_offsets!r}")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale: must lie in (0, 1], got {self.min_scale}")
        check_compile_mode(self.compile)
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format: expected one of {list(MEMORY_FORMATS)}, got {self.memory_format!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must lie in [0, 1), got {getattr(self, name)}")


def check_shard(rank, world) -> Tuple[int, int]:
    """``(rank, world)`` if they are ints with 0 <= rank < world, else ValueError."""
    if not (isinstance(world, int) and isinstance(rank, int) and world >= 1 and 0 <= rank < world):
        raise ValueError(f"shard: need 0 <= rank < world, got rank {rank!r}, world {world!r}")
    return rank, world


def unit_seeds(seed: int, unit: int) -> Tuple[int, int]:
    """(init seed, synthesis seed) of unit ``unit`` of a run seeded ``seed``: the two 64-bit integers made
    of the four 32-bit words of ``numpy.random.SeedSequence((seed mod 2**64, unit)).generate_state(4)``
    (words 0-1 and 2-3, high word first). See the module docstring."""
    w = [int(v) for v in np.random.SeedSequence((int(seed) % 2 ** 64, int(unit))).generate_state(4, np.uint32)]
    return (w[0] << 32) | w[1], (w[2] << 32) | w[3]


def unit_generator(seed: int, unit: int, stream: str, device="cpu") -> torch.Generator:
    """A fresh generator of unit ``unit``: ``stream`` "init" (its noise init) or "synthesis" (its jitter)."""
    init, synthesis = unit_seeds(seed, unit)
    value = {"init": init, "synthesis": synthesis}[stream]
    return torch.Generator(device=torch.device(device)).manual_seed(value)


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
    supports_sharding = True  # torchrun: one shard of IPC indices per process (module docstring)
    writes_jpeg = True  # `fastdd distill` writes DIR/train/<class>/<index>.jpg by default
    needs_real_set = False  # real images only initialise the set: a LazyImageFolder is fine
    # ``iterations`` is per unit here: it places the unit boundaries and the cosine schedule, so it must match
    execution_fields = EXECUTION_FIELDS - {"iterations"}

    def __init__(self, config: RecoverConfig, dataset, device="cpu", shard: Optional[Tuple[int, int]] = None):
        """``shard=(rank, world)``: this process runs that shard (as :meth:`shard` does) and a real-image
        initialisation reads only the shard's rows (:meth:`_initial_images`)."""
        config = resolve_config(config, dataset)
        self._init_shard = None if shard is None else check_shard(*shard)
        super().__init__(config, dataset, device)
        ds = self.dataset
        self.teacher, self.teacher_info = load_teacher(config.teacher, ds.channels, ds.num_classes, ds.image_size,
                                                       self.device)
        self.memory_format = teacher_memory_format(config.memory_format, self.device)
        self.teacher = self.teacher.to(memory_format=self.memory_format)
        self.bn_loss = BNStatisticsLoss(self.teacher, config.first_bn_multiplier, config.r_var)
        # decided from the whole run's step count, so that every torchrun shard makes the same choice
        compiled = should_compile(config.compile, self.device, calls=self.units * config.iterations)
        self._teacher_loss = Compiled(self.teacher_loss, compiled, name=f"{type(self.teacher).__name__} recover loss")
        self.jitter = RecoverJitter(crop=config.crop, jitter=config.jitter, min_scale=config.min_scale,
                                    offsets=config.roll_offsets)
        self.rank, self.world = 0, 1
        self.shard_units: List[int] = list(range(self.units))
        self.unit_gen: Optional[torch.Generator] = None
        mean = torch.tensor(ds.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(ds.std, device=self.device).view(1, -1, 1, 1)
        self.pixel_low, self.pixel_high = (0 - mean) / std, (1 - mean) / std  # [1, C, 1, 1]
        self.work: Optional[torch.nn.Parameter] = None
        self.adam: Optional[torch.optim.Adam] = None
        if shard is not None:
            self.shard(*shard)

    # ------------------------------------------------------------------------------------------- units
    @property
    def class_batches(self) -> int:
        """Class batches per IPC index: ceil(K / batch_classes)."""
        return math.ceil(self.num_classes / self.config.batch_classes)

    @property
    def units(self) -> int:
        """Units of the whole set: IPC indices x class batches."""
        return self.images_per_class * self.class_batches

    @property
    def total_steps(self) -> int:
        """Steps of this process: its units (every unit unless sharded) x iterations per unit."""
        return len(self.shard_units) * self.config.iterations

    def _initial_images(self) -> torch.Tensor:
        """The initial set [K*n, C, H, W]: real images from the run's generator (base class; built with a
        ``shard``, only that shard's rows are read, the others stay zero: they are never used by this
        process and :meth:`merge_shards` overwrites them), or each unit's N(0, 1) draw from its own *init*
        generator (module docstring)."""
        if self.config.init == "real":
            rows = None if self._init_shard is None else self.shard_rows(*self._init_shard)
            return self._initial_real_images(rows)
        shape = self._set_shape()
        out = torch.empty(shape, device=self.device)
        for unit in range(self.units):
            rows = self.unit_rows(unit)[2]
            g = unit_generator(self.config.seed, unit, "init", self.device)
            out[rows] = torch.randn((rows.numel(), *shape[1:]), generator=g, device=self.device)
        return out

    def shard(self, rank: int, world: int) -> RecoverMethod:
        """Make this process rank ``rank`` of ``world``: it runs the units of the IPC indices j with
        j % world == rank (module docstring). Call before :meth:`fit` and :meth:`load_state_dict`."""
        rank, world = check_shard(rank, world)
        if self.iteration:
            raise RuntimeError("shard: the run has already started")
        if self._init_shard is not None and (rank, world) != self._init_shard:
            raise RuntimeError(f"shard: this method was built for rank {self._init_shard[0]} of "
                               f"{self._init_shard[1]} (its initial images hold only that shard's rows)")
        self.rank, self.world = rank, world
        self.shard_units = self.units_of_shard(rank, world)
        return self

    def units_of_shard(self, rank: int, world: int) -> List[int]:
        """The units rank ``rank`` of ``world`` runs, in order: those of the IPC indices j % world == rank."""
        return [u for u in range(self.units) if (u // self.class_batches) % world == rank]

    def shard_rows(self, rank: Optional[int] = None, world: Optional[int] = None) -> torch.Tensor:
        """Set rows [R] written by a shard (default: this process's), units in order."""
        units = self.shard_units if rank is None else self.units_of_shard(rank, world)
        if not units:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        return torch.cat([self.unit_rows(u)[2] for u in units])

    def unit_at(self, step: int) -> Tuple[int, int]:
        """(unit, step t within it) of this process's step ``step``."""
        k, t = divmod(step, self.config.iterations)
        return self.shard_units[k], t

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
        self.unit_gen = unit_generator(cfg.seed, unit, "synthesis", self.device)

    def teacher_loss(self, view: torch.Tensor, labels: torch.Tensor):
        """(total loss, CE, BN term) of the jittered view [B, C, H, W] with labels [B]: no random draw and no
        host sync, so ``torch.compile`` captures it whole (the ``compile`` option)."""
        logits = self.teacher(view.contiguous(memory_format=self.memory_format))
        ce = F.cross_entropy(logits, labels)
        bn = self.bn_loss.loss()
        return ce + self.config.r_bn * bn, ce, bn

    def recover_loss(self, x: torch.Tensor, labels: torch.Tensor):
        """(total loss, CE, BN term) of images x [B, C, H, W] with labels [B], one jitter draw; the teacher
        part runs compiled when the run compiles (:meth:`teacher_loss`)."""
        draw = self.jitter.draw(tuple(x.shape[-2:]), self.unit_gen)
        return self._teacher_loss(self.jitter.apply(x, draw), labels)

    def step(self) -> float:
        cfg = self.config
        unit, t = self.unit_at(self.iteration)
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
        """The base state plus the unit's Adam and synthesis generator; a shard (world > 1) stores only its
        own rows (``shard_rows``) of the set, the rest being the deterministic initial images."""
        state = super().state_dict()
        state["adam"] = None if self.adam is None else self.adam.state_dict()
        state["unit_generator"] = None if self.unit_gen is None else self.unit_gen.get_state()
        state["shard"] = [self.rank, self.world]
        if self.world > 1:
            rows = self.shard_rows()
            state["shard_rows"] = rows.cpu()
            state["synth"] = {"images": self.synth.images.detach()[rows].cpu()}
        return state

    def load_state_dict(self, state: dict) -> None:
        shard = list(state.get("shard", [0, 1]))
        if shard != [self.rank, self.world]:
            raise ValueError(f"checkpoint: written by rank {shard[0]} of {shard[1]} processes, this process is rank "
                             f"{self.rank} of {self.world}; resume with the same number of processes")
        if "shard_rows" in state:  # a shard: its rows over the (deterministic) initial set
            full = self.synth.images.detach().clone()
            full[state["shard_rows"].to(self.device)] = state["synth"]["images"].to(self.device)
            state = dict(state, synth={"images": full})
        super().load_state_dict(state)
        if self.iteration >= self.total_steps:
            return
        unit, t = self.unit_at(self.iteration)
        if t and state.get("adam") is not None:  # resumed inside a unit: rebuild it and its Adam state
            self.start_unit_resumed(unit)
            self.adam.load_state_dict(state["adam"])
            if state.get("unit_generator") is not None:
                self.unit_gen.set_state(state["unit_generator"])

    def start_unit_resumed(self, unit: int) -> None:
        """Rebuild unit ``unit`` in the middle of its run (its rows already hold the current iterate)."""
        RecoverMethod.start_unit(self, unit)

    def merge_shards(self, states: Sequence[dict]) -> RecoverMethod:
        """Put the finished shards' states (:meth:`state_dict` of every rank of one world size, any order)
        into this method's set; afterwards :meth:`synthetic_set` is the whole run's set, ``iteration`` the
        steps of all shards and ``last_loss`` that of the shard which ran the last unit."""
        worlds = {int(s["shard"][1]) for s in states}
        ranks = sorted(int(s["shard"][0]) for s in states)
        if len(worlds) != 1 or ranks != list(range(next(iter(worlds)))):
            raise ValueError(f"merge: expected one state per rank of one world size, got shards "
                             f"{sorted(tuple(s['shard']) for s in states)}")
        world = worlds.pop()
        last_rank = (self.units - 1) // self.class_batches % world
        with torch.no_grad():
            for s in states:
                rank = int(s["shard"][0])
                want = len(self.units_of_shard(rank, world)) * self.config.iterations
                if int(s["iteration"]) != want:
                    raise ValueError(f"merge: rank {rank} stopped at step {s['iteration']} of {want}; "
                                     f"rerun with --resume to finish it")
                rows = self.shard_rows(rank, world)
                images = s["synth"]["images"]
                if world > 1 or "shard_rows" in s:
                    self.synth.images[rows] = images.to(self.device)
                else:
                    self.synth.images.copy_(images.to(self.device))
                if rank == last_rank:
                    self.last_loss = float(s.get("last_loss", float("nan")))
        self.iteration = sum(int(s["iteration"]) for s in states)
        return self
