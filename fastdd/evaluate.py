"""Evaluation protocols: train fresh networks on a (synthetic) set, report test accuracy.

DM protocol (spec ``dm_dance.md`` §1.8): ConvNet trained from scratch with SGD (lr 0.01, momentum 0.9,
weight decay 5e-4), batch 256, per-sample DSA on every mini-batch, the learning rate ×0.1 at half the
epochs (optimizer re-created, momentum reset), test accuracy of the last epoch; mean ± std over models.

``faithful_epochs=True`` (default) reproduces the reference loop exactly: it runs ``epochs + 1`` passes
and decays after pass ``epochs // 2 + 1`` (so 1000 epochs = 502 passes at 0.01 and 499 at 0.001).
``False`` runs ``epochs`` passes and decays after ``epochs // 2``.

Speed: M models are trained at once. Mini-batches, augmentation and the optimiser step are batched
over models (one augmentation call, one SGD step over all models' parameters). On CUDA the weights are
also stacked (``torch.func.stack_module_state``) and one ``torch.vmap``-ed forward runs every model on
its own mini-batch (each model has its own shuffling, augmentation parameters and initialisation); SGD
is element-wise, so the stacked update equals M separate updates. On the CPU (where oneDNN's grouped
convolution backward is slow) and for BatchNorm networks the forward loops over the models instead,
with the same arithmetic (``EvalConfig.vectorise`` overrides the choice).

The random baseline trains the same number of models, with the same initialisations (model i of the
baseline starts from the weights of model i of the synthetic run), on a same-size random real subset:
for sets initialised from real images exactly that initial subset, so the comparison is paired.

Protocols are named (:data:`PROTOCOLS`, :func:`protocol_config`): ``"dm"`` (above, the default) and
``"idc"``, the IDC/DANCE protocol (spec ``dm_dance.md`` §2.7): batch 64, 1500 epochs, MultiStepLR (gamma
0.2) at 2/3 and 5/6 of the epochs (optimizer kept), per-sample DSA ``color_crop_flip_scale_rotate``
(``flip`` dropped for MNIST/SVHN/digits) in IDC composition (flip and color always, one of
crop/scale/rotate per model and mini-batch) then CutMix (p 0.5, Beta(1, 1)); test accuracy every 250
epochs and at the end. It reports the last-epoch accuracy (``accuracies``) and the best over those
checkpoints (``best_accuracies``): the latter is the reference's number, and it is a selection ON THE
TEST SET (optimistic by construction; report it only next to the published figures).

``"kd"`` is the SRe2L/DWA soft-label protocol (:func:`train_stacked_kd`, :mod:`fastdd.kd`): students
trained on the set with a frozen BatchNorm teacher (``teacher``) queried online on every augmented, mixed
batch; the random baseline is trained with exactly the same protocol and teacher. With ``soft_labels`` (a
``fastdd relabel`` directory, :mod:`fastdd.relabel`) the students instead train on the stored batches, crops
and mixes against the stored logits, never querying the teacher (SRe2L's recipe,
:func:`train_stacked_kd_stored`); a same-size baseline replays the same draws on its own images with the
teacher queried online (no labels are stored for it), a baseline of another size trains online.

Its recipe comes from a preset (:data:`KD_PRESETS`, spec ``lowrank_dwa_theory.md`` §2.1 / §2.4; ``kd_preset``
"auto" picks by dataset name and image size, :func:`kd_preset_for`); a value given explicitly wins:

- ``cifar``: 400 epochs, batch 128, AdamW 1e-3 with wd 0.01 on >1-d tensors, cosine per epoch, RandomCrop(pad 4)
  + flip, MixUp 0.8, T 30, no T^2;
- ``tiny``: 200 epochs, batch 64, SGD 0.2 (momentum 0.9, wd 1e-4 on every tensor), 5-epoch linear warm-up from
  0.01x then cosine, RandomResizedCrop(0.08-1) + flip, CutMix 1.0, T 20 with T^2;
- ``imagenet``: 300 epochs, batch 128, AdamW 1e-3 with wd 0.01 on >1-d tensors, cosine per epoch,
  RandomResizedCrop(0.08-1) + flip, CutMix 1.0, T 20, no T^2.

The imagenet batch is DWA's (run_imgnet.sh, online teacher); SRe2L's stored-label recipe used 1024 (a relabel
store supplies its own batch). CIFAR-10 uses the CIFAR-100 values (the reference has no CIFAR-10 script). The
reference CIFAR validator keeps its teacher in train mode; here the teacher is in eval mode unless
``teacher_train_mode``.

Under torchrun (``ddp=True``, kd only) the students train with ``DistributedDataParallel``: every rank draws
the same global batches, augmentations and mixes from the same seeded generator, runs the teacher and the
students on its strided share of the rows (:func:`local_rows`) and DDP averages the gradients, so a step is
the one-process step up to the order of floating-point sums (:func:`fit_stacked_kd`); the test set is scored
in shares and the counts summed (:func:`score_test_set`).

Test sets held in memory (:class:`~fastdd.data.ImageDataset`) are scored in chunks of ``test_batch_size``
rows (:func:`accuracy_stacked`). A lazily read image folder (:class:`~fastdd.data.LazyImageFolder`, e.g.
ImageNet's 50 000 validation JPEGs) is streamed instead: a ``DataLoader`` with ``workers`` decoding
processes (pinned memory on CUDA) yields batches of ``test_batch_size`` rows (0: 256 on a GPU, 64 on a
CPU), each through all stacked models (:func:`accuracy_stream`). A lazy training split only feeds the
random baseline: its few images per class are drawn by the same :class:`~fastdd.data.ClassSampler` rule
and decoded on their own.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from .allocator import reuse_freed_memory
from .augment import DSA, dsa_strategy_for
from .compile import Compiled, cache_rows, check_compile_mode, should_compile
from .data import ClassSampler, ImageDataset, LazyImageFolder
from .models import get_model, has_batchnorm
from .validation import check_labels, check_positive_int, check_tensor


@dataclass
class EvalConfig:
    """Evaluation options: the DM protocol's reference defaults; :func:`protocol_config` sets those of the idc and
    kd protocols (kd: the recipe fields left ``None`` are filled from ``kd_preset`` by :meth:`resolved`)."""

    model: str = "ConvNet"
    num_models: int = 5
    epochs: Optional[int] = 1000  # training epochs (kd: None = from --kd-preset)
    lr: Optional[float] = 0.01  # base learning rate (kd: None = from --kd-preset)
    momentum: float = 0.9  # SGD momentum (dm, idc; kd with --kd-optimizer sgd)
    weight_decay: Optional[float] = 5e-4  # weight decay (kd: None = from --kd-preset)
    batch_size: Optional[int] = 256  # mini-batch size (kd: the global batch; None = from --kd-preset)
    dsa: bool = True
    dsa_strategy: str = ""  # "" -> dataset default
    seed: int = 0
    test_batch_size: int = 0  # rows per test forward; 0: automatic (cache-sized on a CPU, 1000 on a GPU)
    faithful_epochs: bool = True
    vectorise: Optional[bool] = None  # None: vmap over stacked models on CUDA, a loop over models on CPU
    protocol: str = "dm"  # training loop, see PROTOCOLS ("dm" | "idc" | "kd")
    cutmix_p: float = 0.0  # idc: CutMix probability
    eval_every: int = 0  # idc: test accuracy every K epochs (and at the end)
    allow_missing_classes: bool = False  # accept a set in which some class has no image
    compile: str = "auto"  # torch.compile of the training and test forwards: "auto" | "on" | "off"
    teacher: str = ""  # kd: teacher spec (squeeze DIR or resnet18:PATH; `fastdd evaluate`: the set's teacher)
    kd_preset: str = "auto"  # kd: recipe filling the kd values not given: cifar | tiny | imagenet | auto (tiny for tiny-imagenet, imagenet from 128 px, else cifar)
    kd_optimizer: Optional[str] = None  # kd: adamw (decay on >1-d tensors only) | sgd (momentum, decay on all); None: preset
    warmup_epochs: Optional[int] = None  # kd: epochs of linear lr warm-up before the cosine (0: none); None: preset
    warmup_factor: float = 0.01  # kd: the warm-up's first learning rate as a fraction of --lr
    temperature: Optional[float] = None  # kd: softmax temperature of teacher and student; None: preset
    t_squared: Optional[bool] = None  # kd: multiply the KL by T^2 (DWA's Tiny-ImageNet recipe only); None: preset
    mixup_alpha: Optional[float] = None  # kd: MixUp Beta(alpha, alpha) inside each batch (0: off); None: preset
    cutmix_alpha: Optional[float] = None  # kd: CutMix Beta(alpha, alpha) inside each batch (0: off; with MixUp too: one of them per batch); None: preset
    kd_augment: Optional[str] = None  # kd: per-sample augmentation: crop_flip (RandomCrop pad 4 + flip) | rrc_flip (RandomResizedCrop + flip) | none; None: preset
    kd_min_scale: float = 0.08  # kd: rrc_flip's smallest crop area fraction
    teacher_train_mode: bool = False  # kd: teacher BN in train mode (the SRe2L/DWA CIFAR validator's quirk)
    soft_labels: str = ""  # kd: a `fastdd relabel` directory: train on its stored batches and soft labels
    workers: int = 0  # DataLoader workers: replaying stored batches (kd with soft_labels), decoding a lazy test split

    def validate(self) -> None:
        """Check the options. A kd field still ``None`` (not yet filled from its preset, :meth:`resolved`) is
        not checked; the other protocols need every field set."""
        check_positive_int("workers", self.workers, minimum=0)
        if self.soft_labels and self.protocol != "kd":
            raise ValueError(f"soft_labels: stored soft labels need the kd protocol (--protocol kd), got {self.protocol!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        if self.protocol == "kd":
            self._validate_kd()
        else:
            unset = [name for name in ("epochs", "lr", "weight_decay", "batch_size") if getattr(self, name) is None]
            if unset:
                raise ValueError(f"{unset[0]}: must be set for the {self.protocol} protocol (None is filled from "
                                 f"a preset only with the kd protocol)")
        check_positive_int("num_models", self.num_models)
        if self.epochs is not None:
            check_positive_int("epochs", self.epochs)
        if self.batch_size is not None:
            check_positive_int("batch_size", self.batch_size)
        check_positive_int("test_batch_size", self.test_batch_size, minimum=0)
        check_compile_mode(self.compile)
        check_positive_int("eval_every", self.eval_every, minimum=0)
        if not 0.0 <= self.cutmix_p <= 1.0:
            raise ValueError(f"cutmix_p: must lie in [0, 1], got {self.cutmix_p}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")

    def _validate_kd(self) -> None:
        if self.kd_preset not in KD_PRESET_NAMES:
            raise ValueError(f"kd_preset: expected one of {list(KD_PRESET_NAMES)}, got {self.kd_preset!r}")
        if self.kd_augment is not None and self.kd_augment not in KD_AUGMENTS:
            raise ValueError(f"kd_augment: expected one of {list(KD_AUGMENTS)}, got {self.kd_augment!r}")
        if self.kd_optimizer is not None and self.kd_optimizer not in KD_OPTIMIZERS:
            raise ValueError(f"kd_optimizer: expected one of {list(KD_OPTIMIZERS)}, got {self.kd_optimizer!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name}: must be >= 0, got {value}")
        if self.warmup_epochs is not None:
            check_positive_int("warmup_epochs", self.warmup_epochs, minimum=0)
            if self.epochs is not None and self.warmup_epochs >= self.epochs:
                raise ValueError(f"warmup_epochs: must be < epochs ({self.epochs}), got {self.warmup_epochs}")
        if not 0 < self.warmup_factor <= 1:
            raise ValueError(f"warmup_factor: must lie in (0, 1], got {self.warmup_factor}")
        if not 0 < self.kd_min_scale <= 1:
            raise ValueError(f"kd_min_scale: must lie in (0, 1], got {self.kd_min_scale}")

    def resolved(self, dataset_name: str = "", image_size: Sequence[int] = ()) -> EvalConfig:
        """A validated copy; for the kd protocol every ``None`` field taken from :data:`KD_PRESETS`
        (``kd_preset`` "auto": :func:`kd_preset_for` the dataset name and image size (H, W)) and ``kd_preset``
        set to the preset used. Fields already set (flags given, or a relabel store's epochs, batch and T) win.
        Other protocols: ``self`` validated, unchanged."""
        self.validate()
        if self.protocol != "kd":
            return self
        name = kd_preset_for(dataset_name, image_size) if self.kd_preset == "auto" else self.kd_preset
        fill = {k: v for k, v in KD_PRESETS[name].items() if getattr(self, k) is None}
        out = dataclasses.replace(self, kd_preset=name, **fill)
        out.validate()
        return out


#: The KD recipes of spec ``lowrank_dwa_theory.md`` §2.1 / §2.4 (values read in the reference code, tagged
#: [CODE] there unless noted): the EvalConfig fields each one fills when they are ``None``.
KD_PRESETS = {
    # SRe2L relabel_cifar.py = DWA validation_cifar.py (+ run_cifar.sh: 400 epochs): AdamW 1e-3, wd 0.01 on >1-d
    # tensors, cosine per epoch, batch 128, RandomCrop(32, 4) + flip, MixUp 0.8 on every batch, T 30, no T^2.
    # CIFAR-10 has no script; the code's cifar10 branch has the same defaults (spec: CIFAR-10 values unverified)
    "cifar": dict(epochs=400, batch_size=128, kd_optimizer="adamw", lr=1e-3, weight_decay=0.01, warmup_epochs=0,
                  temperature=30.0, t_squared=False, mixup_alpha=0.8, cutmix_alpha=0.0, kd_augment="crop_flip"),
    # DWA validation_tiny.py + run_tiny.sh (torchvision reference): SGD 0.2, momentum 0.9, wd 1e-4 on every
    # tensor (norm_weight_decay None), cosine over E - 5 epochs after a 5-epoch linear warm-up from 0.01x,
    # batch 64, 200 epochs, RandomResizedCrop(64) + flip, CutMix 1.0 (mixup 0), KL at T 20 TIMES T^2
    "tiny": dict(epochs=200, batch_size=64, kd_optimizer="sgd", lr=0.2, weight_decay=1e-4, warmup_epochs=5,
                 temperature=20.0, t_squared=True, mixup_alpha=0.0, cutmix_alpha=1.0, kd_augment="rrc_flip"),
    # DWA validation_imgnet.py + run_imgnet.sh: AdamW 1e-3, wd 0.01 on >1-d tensors, cosine per epoch, 300 epochs,
    # RandomResizedCrop(224, 0.08-1) + flip, CutMix 1.0, online teacher, T 20, no T^2, batch 128 (DWA's script;
    # SRe2L's train_FKD.sh uses a global batch of 1024: --batch-size 1024)
    "imagenet": dict(epochs=300, batch_size=128, kd_optimizer="adamw", lr=1e-3, weight_decay=0.01, warmup_epochs=0,
                     temperature=20.0, t_squared=False, mixup_alpha=0.0, cutmix_alpha=1.0, kd_augment="rrc_flip"),
}
KD_PRESET_NAMES = ("auto", *KD_PRESETS)
KD_AUGMENTS = ("crop_flip", "rrc_flip", "none")
KD_OPTIMIZERS = ("adamw", "sgd")


def kd_preset_for(dataset_name: str, image_size: Sequence[int] = ()) -> str:
    """The kd preset ``auto`` picks (the rule of the relabel and recover presets): ``tiny`` for a dataset whose
    name contains "tiny", ``imagenet`` from 128 px (the smaller image side), else ``cifar``."""
    if "tiny" in dataset_name.lower():
        return "tiny"
    return "imagenet" if image_size and min(image_size) >= 128 else "cifar"


#: Named evaluation protocols: the EvalConfig fields each one sets (everything else keeps its default). The kd
#: protocol leaves its recipe fields None: :meth:`EvalConfig.resolved` fills them from ``kd_preset``.
PROTOCOLS = {
    "dm": {},
    "idc": {"protocol": "idc", "epochs": 1500, "batch_size": 64, "cutmix_p": 0.5, "eval_every": 250},
    "kd": {"protocol": "kd", "dsa": False, **{name: None for name in KD_PRESETS["cifar"]}},
}


def protocol_config(name: str, **overrides) -> EvalConfig:
    """The EvalConfig of protocol ``name`` ("dm", "idc" or "kd"), with ``overrides`` applied on top (kd: the fields
    left None come from ``kd_preset`` when the config is :meth:`~EvalConfig.resolved`)."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {sorted(PROTOCOLS)}, got {name!r}")
    return EvalConfig(**{**PROTOCOLS[name], **overrides})


def idc_strategy_for(dataset_name: str) -> str:
    """IDC evaluation augmentation: ``color_crop_flip_scale_rotate``; without flip for digit datasets."""
    from .augment import NO_FLIP_STRATEGY

    return "color_crop_scale_rotate" if dsa_strategy_for(dataset_name) == NO_FLIP_STRATEGY else \
        "color_crop_flip_scale_rotate"


class StackedModels:
    """M networks of one architecture evaluated as one: ``forward(x [M, B, C, H, W]) -> [M, B, K]``."""

    def __init__(self, models: Sequence[torch.nn.Module], vectorise: Optional[bool] = None, compile: bool = False):
        self.models = list(models)
        device = next(self.models[0].parameters()).device
        if vectorise is None:  # grouped convolutions are fast on GPUs, slow in oneDNN's CPU backward
            vectorise = device.type == "cuda"
        self.vectorised = vectorise and not has_batchnorm(self.models[0])
        # model loop: one compiled graph (parameters as inputs) serves every model; BatchNorm's running
        # statistics would be mutated graph inputs, so BN networks stay eager
        self.compiled = compile and not self.vectorised and not has_batchnorm(self.models[0])
        self.channels_last = device.type == "cpu"  # oneDNN's fast layout for the no-grad test forward
        if self.compiled:
            self.base = copy.deepcopy(self.models[0]).to("meta")
            self._params = [dict(m.named_parameters()) for m in self.models]
            self._fwd = Compiled(lambda p, x: functional_call(self.base, p, (x,)), True,
                                 name=f"{type(self.base).__name__} forward")
        if self.vectorised:
            self.params, self.buffers_ = stack_module_state(self.models)
            self.base = copy.deepcopy(self.models[0]).to("meta")

            def call(p, b, x):
                return functional_call(self.base, (p, b), (x,))

            self._train_fn = torch.vmap(call, in_dims=(0, 0, 0))
            self._shared_fn = torch.vmap(call, in_dims=(0, 0, None))

    def parameters(self) -> List[torch.Tensor]:
        if self.vectorised:
            return list(self.params.values())
        return [p for m in self.models for p in m.parameters()]

    def buffers(self) -> List[torch.Tensor]:
        """Every model's buffers (BatchNorm running statistics); the stacked ones when vectorised."""
        if self.vectorised:
            return list(self.buffers_.values())
        return [b for m in self.models for b in m.buffers()]

    def state_dicts(self) -> List[dict]:
        """Model m's current ``state_dict()`` (detached tensors), for every m."""
        if not self.vectorised:
            return [{k: v.detach() for k, v in m.state_dict().items()} for m in self.models]
        stacked = {**self.params, **self.buffers_}
        return [{k: v[i].detach() for k, v in stacked.items()} for i in range(len(self.models))]

    def as_module(self) -> torch.nn.Module:
        """One ``nn.Module`` over all M models whose ``forward(x [M, B, ...]) -> [M, B, K]`` is this stack's
        ``__call__`` and whose parameters are exactly :meth:`parameters` (for DistributedDataParallel, which
        all-reduces the gradients of one module). Call it before creating the optimizer: when vectorised the
        stacked tensors are turned into ``nn.Parameter`` s (same storage) and replace ``self.params``."""
        return _StackModule(self)

    def train(self, mode: bool = True) -> None:
        for m in self.models:
            m.train(mode)
        if self.vectorised or self.compiled:
            self.base.train(mode)

    def _one(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self._fwd(self._params[i], x) if self.compiled else self.models[i](x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Per-model inputs x [M, B, ...] -> logits [M, B, K]."""
        if self.vectorised:
            return self._train_fn(self.params, self.buffers_, x)
        return torch.stack([self._one(i, xi) for i, xi in enumerate(x)])

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """One input batch x [B, ...] for every model -> logits [M, B, K]."""
        if self.vectorised:
            return self._shared_fn(self.params, self.buffers_, x)
        if self.channels_last and x.dim() == 4 and not torch.is_grad_enabled():
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.stack([self._one(i, x) for i in range(len(self.models))])


class _StackModule(torch.nn.Module):
    """:meth:`StackedModels.as_module`: the models (a ``ModuleList``), or the stacked parameters of a vectorised
    stack as ``nn.Parameter`` s (names with "." spelled "__"), and the stack's forward."""

    def __init__(self, stack: StackedModels):
        super().__init__()
        object.__setattr__(self, "stack", stack)  # not a submodule: the parameters are registered below
        if stack.vectorised:
            stack.params = {k: v if isinstance(v, torch.nn.Parameter) else torch.nn.Parameter(v.detach())
                            for k, v in stack.params.items()}
            self.stacked = torch.nn.ParameterDict({k.replace(".", "__"): v for k, v in stack.params.items()})
        else:
            self.models = torch.nn.ModuleList(stack.models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(x)


def epoch_learning_rates(cfg: EvalConfig) -> List[float]:
    """Learning rate of every training pass (see the module docstring for the two schedules)."""
    if cfg.faithful_epochs:
        passes, decayed_from = cfg.epochs + 1, cfg.epochs // 2 + 2
    else:
        passes, decayed_from = cfg.epochs, cfg.epochs // 2
    return [cfg.lr if e < decayed_from else cfg.lr * 0.1 for e in range(passes)]


def fresh_models(cfg: EvalConfig, model_seeds: Sequence[int], channels: int, num_classes: int, im_size,
                 device, calls: Optional[int] = None) -> StackedModels:
    """``cfg.model`` networks, model m initialised from ``Generator(seed=model_seeds[m])``, stacked; compiled
    per ``cfg.compile`` for a run of about ``calls`` forward calls (:func:`fastdd.compile.should_compile`)."""
    models = []
    for seed in model_seeds:
        g = torch.Generator(device=device).manual_seed(int(seed))
        models.append(get_model(cfg.model, channels, num_classes, im_size, generator=g).to(device))
    return StackedModels(models, cfg.vectorise, compile=should_compile(cfg.compile, device, calls))


def epoch_batches(m_models: int, n: int, batch_size: int, generator: torch.Generator, device):
    """One epoch's mini-batches for M models: index tensors [M, b] into [0, n), an independent shuffle per
    model (one draw of M*n keys from ``generator`` when iteration starts)."""
    keys = torch.rand(m_models, n, generator=generator, device=generator.device).to(device)
    order = keys.argsort(dim=1)
    for start in range(0, n, batch_size):
        yield order[:, start:start + batch_size]


def _fit(net: StackedModels, train_images: torch.Tensor, train_labels: torch.Tensor, cfg: EvalConfig,
         generator: torch.Generator, *, lrs: Sequence[float], reset_on_decay: bool, augment, loss_fn,
         bar=None):
    """The training loop both protocols share: for every epoch e (learning rate ``lrs[e]``), one shuffled
    pass of every model over its set, per-sample augmentation (``augment(x [M*b, C, H, W], generator,
    op_groups [M*b]) -> [M*b, C, H, W]``, groups = model index, or ``None``), ``loss_fn(logits_fn, x, y)``
    summed over models, one SGD step over all models. When the learning rate changes the optimizer is
    re-created (``reset_on_decay``: momentum reset, the DM reference) or its rate set in place (IDC).
    Yields the epoch index after each epoch (the caller may test the models there).
    Shapes: train_images [M, N, C, H, W], train_labels [M, N]."""
    device = train_images.device
    m_models, n = train_images.shape[:2]
    chw = train_images.shape[2:]

    def make_optimizer(lr_now):
        return torch.optim.SGD(net.parameters(), lr=lr_now, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    optimizer = make_optimizer(lrs[0])
    rows = torch.arange(m_models, device=device).unsqueeze(1)  # [M, 1]
    groups = None
    for epoch, lr in enumerate(lrs):
        if epoch and lr != lrs[epoch - 1]:
            if reset_on_decay:
                optimizer = make_optimizer(lr)  # the DM reference re-creates SGD: momentum is reset
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr
        net.train(True)
        for idx in epoch_batches(m_models, n, cfg.batch_size, generator, device):  # [M, b]
            x, y = train_images[rows, idx], train_labels[rows, idx]  # [M, b, C, H, W], [M, b]
            b = idx.shape[1]
            if augment is not None:
                if groups is None or groups.numel() != m_models * b:
                    groups = rows.expand(m_models, b).reshape(-1).to(generator.device)
                x = augment(x.reshape(m_models * b, *chw), generator, op_groups=groups).view(m_models, b, *chw)
            loss = loss_fn(net, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if bar is not None:
            bar.update(m_models)
        yield epoch


def _work(m_models: int, n: int, passes: int, test_images, checkpoints: int) -> int:
    """The run's forward work in units of 256 image rows (a training row counts 3: forward + backward), the
    ``calls`` that :func:`fastdd.compile.should_compile` weighs against the compile time."""
    return (3 * m_models * n * passes + checkpoints * m_models * len(test_images)) // 256


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="model-epoch", leave=False)


@reuse_freed_memory()
def train_stacked(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    cfg: EvalConfig,
    *,
    dataset_name: str = "",
    model_seeds: Sequence[int],
    generator: torch.Generator,
    progress: bool = False,
    protocol: str = "dm",
    ddp: bool = False,
) -> torch.Tensor:
    """Train M = len(model_seeds) fresh models, model m on ``train_images[m]``, with the training loop of
    ``protocol`` (module docstring; ``cfg.protocol`` is not consulted); return test accuracies: [M] after
    the last epoch ("dm", and "kd" through :func:`train_stacked_kd`), or [M, P] at the P checkpoints
    ("idc": every ``eval_every`` epochs and the last epoch). ``ddp``: DistributedDataParallel across the
    torchrun ranks (kd only, :func:`fit_stacked_kd`).

    train_images [M, N, C, H, W] (may be an expanded view of one set), train_labels [M, N],
    test_images [T, C, H, W], test_labels [T]. Accuracies are fractions in [0, 1]. ``progress``: a tqdm
    bar over models x epochs.
    """
    if protocol == "kd":
        return train_stacked_kd(train_images, train_labels, test_images, test_labels, num_classes, cfg,
                                model_seeds=model_seeds, generator=generator, progress=progress,
                                dataset_name=dataset_name, ddp=ddp)
    if ddp:
        raise ValueError(f"ddp: only the kd protocol trains with DistributedDataParallel, got protocol {protocol!r}")
    m_models, n = train_images.shape[:2]
    if protocol == "idc":
        from .idc import IDCAugment, cutmix, cutmix_loss, multistep_lr

        lrs = [multistep_lr(cfg.lr, epoch, cfg.epochs) for epoch in range(cfg.epochs)]
        every, n_checkpoints = cfg.eval_every, (cfg.epochs // cfg.eval_every if cfg.eval_every else 0) + 1
        aug = IDCAugment(cfg.dsa_strategy or idc_strategy_for(dataset_name)) if cfg.dsa else None
        augment, desc = None if aug is None else aug.per_sample, f"evaluate {m_models} models (idc)"

        def loss_fn(net, x, y):
            x, ya, yb, lam = cutmix(x, y, generator, cfg.cutmix_p)
            return cutmix_loss(net(x), ya, yb, lam)
    else:
        lrs = epoch_learning_rates(cfg)
        every, n_checkpoints = 0, 1
        dsa = DSA(cfg.dsa_strategy or dsa_strategy_for(dataset_name)) if cfg.dsa else None
        augment, desc = None if dsa is None else dsa.per_sample, f"evaluate {m_models} models"

        def loss_fn(net, x, y):  # sum over models of each model's mean loss: independent gradients per model
            logits = net(x)  # [M, b, K]
            return F.cross_entropy(logits.reshape(-1, num_classes), y.reshape(-1), reduction="sum") / x.shape[1]
    net = fresh_models(cfg, model_seeds, train_images.shape[2], num_classes, tuple(train_images.shape[3:]),
                       train_images.device, calls=_work(m_models, n, len(lrs), test_images, n_checkpoints))
    checkpoints = []
    with _progress(m_models * len(lrs), progress, desc) as bar:
        for epoch in _fit(net, train_images, train_labels, cfg, generator, lrs=lrs, reset_on_decay=protocol != "idc",
                          augment=augment, loss_fn=loss_fn, bar=bar):
            if (every and (epoch + 1) % every == 0) or epoch + 1 == len(lrs):
                checkpoints.append(score_test_set(net, test_images, test_labels, cfg))
    return torch.stack(checkpoints, dim=1) if protocol == "idc" else checkpoints[0]


def dist_rank_world(ddp: bool) -> Tuple[int, int]:
    """(rank, world size) of a DistributedDataParallel evaluation (``ddp``), (0, 1) without. ``ddp`` needs the
    default ``torch.distributed`` process group (``fastdd evaluate`` under torchrun joins it)."""
    if not ddp:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("ddp: torch.distributed is not initialised (run under torchrun; `fastdd evaluate` "
                         "joins the process group itself)")
    return dist.get_rank(), dist.get_world_size()


def local_rows(x: torch.Tensor, rank: int, world: int, dim: int = 0) -> Tuple[torch.Tensor, float]:
    """This rank's share of a global batch along ``dim``: rows rank, rank + world, ... (``DistributedSampler``'s
    strided split), and the weight 1.0. A rank left without rows (a batch smaller than the world) gets row 0 with
    weight 0.0: it still runs a forward and backward, so that every rank contributes to DDP's all-reduce."""
    if world == 1:
        return x, 1.0
    index = torch.arange(rank, x.shape[dim], world, device=x.device)
    if index.numel() == 0:
        return x.narrow(dim, 0, 1), 0.0
    return x.index_select(dim, index), 1.0


def _train_forward(net: StackedModels, ddp: bool):
    """The students' training forward (x [M, b, ...] -> [M, b, K]): ``net`` itself, or under ``ddp`` a
    ``DistributedDataParallel`` over :meth:`StackedModels.as_module` (all M students in one module: one set of
    gradient all-reduces per step, gloo on the CPU, nccl on CUDA). Create the optimizer after this call."""
    if not ddp:
        return net
    from torch.nn.parallel import DistributedDataParallel

    device = net.parameters()[0].device
    return DistributedDataParallel(net.as_module(), device_ids=[device.index] if device.type == "cuda" else None)


def _sync_buffers(net: StackedModels, ddp: bool) -> None:
    """Under ``ddp`` give every rank rank 0's buffers (BatchNorm running statistics, which each rank updated on
    its own rows), so that all ranks hold the same students for the split test-set scoring."""
    if ddp:
        import torch.distributed as dist

        for b in net.buffers():
            dist.broadcast(b, src=0)


def _kd_augment(x: torch.Tensor, cfg: EvalConfig, generator: torch.Generator) -> torch.Tensor:
    """``cfg.kd_augment`` per sample of x [M, b, C, H, W] -> [M, b, C, H, W] (draws from ``generator``)."""
    from .crops import random_crop_flip, random_resized_crop_flip

    m, b, *chw = x.shape
    if cfg.kd_augment == "crop_flip":
        return random_crop_flip(x.reshape(m * b, *chw), generator).view(m, b, *chw)
    if cfg.kd_augment == "rrc_flip":
        return random_resized_crop_flip(x.reshape(m * b, *chw), generator, (cfg.kd_min_scale, 1.0)).view(m, b, *chw)
    return x


def _kd_optimizer(net: StackedModels, cfg: EvalConfig) -> torch.optim.Optimizer:
    from .kd import kd_optimizer

    return kd_optimizer(net.parameters(), cfg.kd_optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)


def _set_kd_lr(optimizer: torch.optim.Optimizer, cfg: EvalConfig, epoch: int) -> None:
    from .kd import kd_epoch_lr

    lr = kd_epoch_lr(cfg.lr, epoch, cfg.epochs, cfg.warmup_epochs, cfg.warmup_factor)
    for group in optimizer.param_groups:
        group["lr"] = lr


@reuse_freed_memory()
def fit_stacked_kd(train_images: torch.Tensor, test_images, num_classes: int, cfg: EvalConfig, *,
                   model_seeds: Sequence[int], generator: torch.Generator, progress: bool = False,
                   dataset_name: str = "", ddp: bool = False) -> StackedModels:
    """Train M = len(model_seeds) students with the online soft-label KD protocol (:mod:`fastdd.kd`); returns the
    trained :class:`StackedModels`. train_images [M, N, C, H, W] (model m trains on ``train_images[m]``; the
    set's hard labels are never used), ``test_images`` only sizes the compile decision.

    ``cfg`` is resolved first (:meth:`EvalConfig.resolved` with ``dataset_name`` and the image size). Every
    epoch e (lr :func:`fastdd.kd.kd_epoch_lr`, optimiser ``kd_optimizer``), every model's shuffled mini-batch of
    ``batch_size`` images is augmented per sample (``kd_augment``), mixed (``mixup_alpha`` / ``cutmix_alpha``),
    labelled by the frozen teacher ``cfg.teacher`` on exactly that input, and the students minimise the KL at
    ``temperature`` (times T^2 with ``t_squared``).

    ``ddp`` (a torchrun process group, :func:`dist_rank_world`): every rank draws the same global batch order,
    augmentation and mix from the same seeded ``generator`` (on every rank, for the whole global batch); rank r
    then runs the teacher and the students on rows r, r + world, ... of it (:func:`local_rows`) with the loss
    divided by B / world instead of B, and ``DistributedDataParallel`` averages the gradients, so each step is
    the 1-process step up to the order of the floating-point sums. Students with BatchNorm normalise over the
    rank's rows (plain DDP, no SyncBatchNorm), as does a teacher in train mode; those runs then differ from 1
    process."""
    from .kd import kd_loss, mix_groups
    from .teacher import load_teacher

    device = train_images.device
    m_models, n = train_images.shape[:2]
    chw = tuple(train_images.shape[2:])
    cfg = cfg.resolved(dataset_name, chw[1:])
    rank, world = dist_rank_world(ddp)
    teacher, _ = load_teacher(cfg.teacher, chw[0], num_classes, chw[1:], device)
    teacher.train(cfg.teacher_train_mode)
    net = fresh_models(cfg, model_seeds, chw[0], num_classes, chw[1:], device,
                       calls=_work(m_models, -(-n // world), cfg.epochs, test_images, checkpoints=1))
    forward = _train_forward(net, ddp)
    optimizer = _kd_optimizer(net, cfg)
    rows = torch.arange(m_models, device=device).unsqueeze(1)
    with _progress(m_models * cfg.epochs, progress, f"evaluate {m_models} models (kd)") as bar:
        for epoch in range(cfg.epochs):
            _set_kd_lr(optimizer, cfg, epoch)
            net.train(True)
            for idx in epoch_batches(m_models, n, cfg.batch_size, generator, device):  # [M, b]
                x = _kd_augment(train_images[rows, idx], cfg, generator)  # [M, b, C, H, W], the global batch
                x = mix_groups(x, generator, cfg.mixup_alpha, cfg.cutmix_alpha)
                x, weight = local_rows(x, rank, world, dim=1)  # [M, b_r, C, H, W]
                with torch.no_grad():
                    soft = teacher(x.reshape(-1, *chw)).view(m_models, x.shape[1], num_classes)
                loss = kd_loss(forward(x), soft, cfg.temperature, cfg.t_squared, divisor=idx.shape[1] / world)
                optimizer.zero_grad(set_to_none=True)
                (loss * weight if weight != 1.0 else loss).backward()
                optimizer.step()
            bar.update(m_models)
    _sync_buffers(net, ddp)
    return net


def train_stacked_kd(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                     test_labels: torch.Tensor, num_classes: int, cfg: EvalConfig, *, model_seeds: Sequence[int],
                     generator: torch.Generator, progress: bool = False, dataset_name: str = "",
                     ddp: bool = False) -> torch.Tensor:
    """The soft-label KD protocol for M stacked students (:func:`fit_stacked_kd`); returns their test accuracies
    [M] (:func:`score_test_set`, split across the ranks under ``ddp``). Shapes as :func:`train_stacked`;
    ``train_labels`` is not used (the teacher labels every batch)."""
    net = fit_stacked_kd(train_images, test_images, num_classes, cfg, model_seeds=model_seeds, generator=generator,
                         progress=progress, dataset_name=dataset_name, ddp=ddp)
    return score_test_set(net, test_images, test_labels, cfg, ddp=ddp)


def train_stacked_kd_stored(sources: Sequence[torch.Tensor], store, test_images: torch.Tensor,
                            test_labels: torch.Tensor, num_classes: int, cfg: EvalConfig, *,
                            model_seeds: Sequence[int], teacher: Optional[torch.nn.Module] = None,
                            progress: bool = False, ddp: bool = False) -> torch.Tensor:
    """:func:`fit_stacked_kd_stored`, then the test accuracies [S * M] (source-major) of its students
    (:func:`score_test_set`, split across the ranks under ``ddp``)."""
    net = fit_stacked_kd_stored(sources, store, test_images, num_classes, cfg, model_seeds=model_seeds,
                                teacher=teacher, progress=progress, ddp=ddp)
    return score_test_set(net, test_images, test_labels, cfg, ddp=ddp)


@reuse_freed_memory()
def fit_stacked_kd_stored(sources: Sequence[torch.Tensor], store, test_images, num_classes: int, cfg: EvalConfig, *,
                          model_seeds: Sequence[int], teacher: Optional[torch.nn.Module] = None,
                          progress: bool = False, ddp: bool = False) -> StackedModels:
    """SRe2L's post-training from stored soft labels (:mod:`fastdd.relabel`) for M = len(model_seeds)
    students per source; returns the S * M trained students (source-major) as one :class:`StackedModels`.

    ``sources[0]`` is the distilled set [N, C, H, W], replayed by a :class:`~fastdd.relabel.ReplayDataset`
    with its stored logits; every further source (same N, e.g. the random baseline) replays the same
    batches, crops and mixes on its own images, labelled online by ``teacher`` (eval mode) and rounded as
    the store rounds (fp16, the same top-k fold). All S * M students see their source's batch sequence of
    the first ``cfg.epochs`` stored epochs (optimiser ``kd_optimizer``, lr :func:`fastdd.kd.kd_epoch_lr`, KL at
    ``temperature``); ``cfg`` is resolved with the sources' image size. Under ``ddp`` every rank replays every
    stored batch and keeps rows rank, rank + world, ... of it (:func:`local_rows`), as :func:`fit_stacked_kd`."""
    from .kd import kd_loss
    from .relabel import decode_logits, encode_logits, replay_loader

    device = test_images.device if isinstance(test_images, torch.Tensor) else sources[0].device
    m_models = len(model_seeds)
    chw = tuple(sources[0].shape[1:])
    cfg = cfg.resolved("", chw[1:])
    rank, world = dist_rank_world(ddp)
    workers = cfg.workers
    loaders = [replay_loader(x.cpu() if workers else x, store, with_labels=s == 0, num_workers=workers)
               for s, x in enumerate(sources)]
    net = fresh_models(cfg, list(model_seeds) * len(sources), chw[0], num_classes, chw[1:], device,
                       calls=_work(m_models * len(sources), -(-sources[0].shape[0] // world), cfg.epochs,
                                   test_images, 1))
    forward = _train_forward(net, ddp)
    optimizer = _kd_optimizer(net, cfg)
    rc = store.config
    if teacher is not None:
        teacher.eval()
    total = m_models * len(sources)
    with _progress(total * cfg.epochs, progress, f"evaluate {total} models (kd, stored labels)") as bar:
        for epoch in range(cfg.epochs):
            _set_kd_lr(optimizer, cfg, epoch)
            net.train(True)
            for _, sampler in loaders:
                sampler.set_epoch(epoch)
            for batches in zip(*(loader for loader, _ in loaders)):
                xs, softs = [], []
                b = batches[0][0].shape[0]
                for x, soft in batches:
                    x, weight = local_rows(x.to(device), rank, world)
                    if soft is None:
                        with torch.no_grad():
                            soft = decode_logits(encode_logits(teacher(x), rc.topk, rc.fold_temperature), num_classes)
                    else:
                        soft = local_rows(soft, rank, world)[0]
                    xs.append(x.unsqueeze(0).expand(m_models, *x.shape))
                    softs.append(soft.to(device).unsqueeze(0).expand(m_models, *soft.shape))
                loss = kd_loss(forward(torch.cat(xs)), torch.cat(softs), cfg.temperature, cfg.t_squared,
                               divisor=b / world)
                optimizer.zero_grad(set_to_none=True)
                (loss * weight if weight != 1.0 else loss).backward()
                optimizer.step()
            bar.update(total)
    _sync_buffers(net, ddp)
    return net


def default_test_batch(images: torch.Tensor) -> int:
    """Rows per test forward when ``test_batch_size`` is 0: 1000 on a GPU; on a CPU the cache-sized chunk
    of :func:`fastdd.methods.dm.default_real_chunk` (for a 1x28x28 / 3x32x32 ConvNet-3)."""
    if images.device.type != "cpu":
        return 1000
    return cache_rows(128 * 32 * 32 * 4)


@torch.no_grad()
def hits_stacked(net: StackedModels, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Correct predictions [M] (int64) of every stacked model on images [T, C, H, W] with labels [T] (T may be 0),
    in chunks of ``batch_size`` rows (0: :func:`default_test_batch`); every chunk goes through all models before
    the next."""
    net.train(False)
    batch_size = batch_size or default_test_batch(images)
    correct = torch.zeros(len(net.models), dtype=torch.int64, device=images.device)
    for start in range(0, images.shape[0], batch_size):
        logits = net.shared(images[start:start + batch_size])
        correct += (logits.argmax(-1) == labels[start:start + batch_size]).sum(-1)
    return correct


def accuracy_stacked(net: StackedModels, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Test accuracy [M] of every stacked model on images [T, C, H, W] with labels [T] (:func:`hits_stacked` / T)."""
    return hits_stacked(net, images, labels, batch_size).double() / images.shape[0]


def score_test_set(net: StackedModels, images: Union[torch.Tensor, LazyImageFolder],
                   labels: Optional[torch.Tensor], cfg: EvalConfig, ddp: bool = False) -> torch.Tensor:
    """Test accuracy [M]: :func:`accuracy_stacked` for a tensor ``images`` [T, C, H, W] with ``labels`` [T];
    :func:`accuracy_stream` for a :class:`~fastdd.data.LazyImageFolder` (its own labels; ``labels`` unused),
    with ``cfg.test_batch_size`` rows per batch and ``cfg.workers`` DataLoader workers. Under ``ddp`` rank r
    scores test rows r, r + world, ... and the correct counts and row counts are summed over the ranks
    (``all_reduce``), so every rank returns the accuracy on the whole test set."""
    if not ddp:
        if isinstance(images, torch.Tensor):
            return accuracy_stacked(net, images, labels, cfg.test_batch_size)
        return accuracy_stream(net, images, cfg.test_batch_size, cfg.workers)
    import torch.distributed as dist

    rank, world = dist_rank_world(True)
    if isinstance(images, torch.Tensor):
        part = torch.arange(rank, images.shape[0], world, device=images.device)
        correct = hits_stacked(net, images[part], labels[part], cfg.test_batch_size)
        total = torch.tensor([part.numel()], dtype=torch.int64, device=correct.device)
    else:
        from torch.utils.data import Subset

        correct, rows = hits_stream(net, Subset(images, range(rank, len(images), world)), cfg.test_batch_size,
                                    cfg.workers)
        total = torch.tensor([rows], dtype=torch.int64, device=correct.device)
    both = torch.cat([correct, total])
    dist.all_reduce(both)
    return both[:-1].double() / both[-1]


@torch.no_grad()
def hits_stream(net: StackedModels, dataset, batch_size: int = 0, workers: int = 0) -> Tuple[torch.Tensor, int]:
    """(correct predictions [M] (int64), rows read) of every stacked model on a map-style dataset of
    ``(image [C, H, W], label)`` (a :class:`~fastdd.data.LazyImageFolder` or a ``Subset`` of one), read in order
    through a ``DataLoader`` with ``workers`` processes and ``batch_size`` rows per batch (0:
    :func:`fastdd.data.lazy.default_stream_batch`); every batch goes through all models before the next."""
    from .data.lazy import default_stream_batch, make_loader

    device = net.parameters()[0].device
    net.train(False)
    correct, total = torch.zeros(len(net.models), dtype=torch.int64, device=device), 0
    if len(dataset) == 0:
        return correct, 0
    loader = make_loader(dataset, batch_size or default_stream_batch(device), workers, device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        correct += (net.shared(x).argmax(-1) == y).sum(-1)
        total += y.shape[0]
    return correct, total


def accuracy_stream(net: StackedModels, dataset, batch_size: int = 0, workers: int = 0) -> torch.Tensor:
    """Test accuracy [M] of every stacked model on a map-style dataset of ``(image [C, H, W], label)``
    (:func:`hits_stream`, divided by the rows read)."""
    correct, total = hits_stream(net, dataset, batch_size, workers)
    return correct.double() / total


@dataclass
class EvalResult:
    """Accuracies in percent: the synthetic set's models and the random-subset baseline's."""

    accuracies: List[float]  # last-epoch accuracy of every model
    baseline_accuracies: List[float]
    seconds: float
    config: dict
    checkpoint_accuracies: Optional[List[List[float]]] = None  # idc: [model][checkpoint]
    baseline_checkpoint_accuracies: Optional[List[List[float]]] = None
    notes: dict = field(default_factory=dict)  # how each side was labelled (kd with stored soft labels)

    @staticmethod
    def _mean_std(values):
        t = torch.tensor(values, dtype=torch.float64)
        return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0

    def to_dict(self) -> dict:
        mean, std = self._mean_std(self.accuracies)
        bmean, bstd = self._mean_std(self.baseline_accuracies)
        return {
            "accuracy_mean": mean,
            "accuracy_std": std,
            "random_baseline_mean": bmean,
            "random_baseline_std": bstd,
            "accuracies": self.accuracies,
            "random_baseline_accuracies": self.baseline_accuracies,
            "seconds": self.seconds,
            "config": self.config,
        } | self.notes | self._best_dict()

    def _best_dict(self) -> dict:
        """IDC protocol: best over the test checkpoints (test-set selection, as the reference)."""
        if self.checkpoint_accuracies is None:
            return {}
        best = [max(c) for c in self.checkpoint_accuracies]
        bbest = [max(c) for c in self.baseline_checkpoint_accuracies or []]
        mean, std = self._mean_std(best)
        out = {"best_accuracy_mean": mean, "best_accuracy_std": std, "best_accuracies": best,
               "checkpoint_accuracies": self.checkpoint_accuracies,
               "best_is_test_set_selection": True}
        if bbest:
            bmean, bstd = self._mean_std(bbest)
            out.update(best_random_baseline_mean=bmean, best_random_baseline_std=bstd,
                       baseline_checkpoint_accuracies=self.baseline_checkpoint_accuracies)
        return out

    def summary(self) -> str:
        d = self.to_dict()
        text = (f"synthetic set: {d['accuracy_mean']:.2f} ± {d['accuracy_std']:.2f} %   "
                f"random real subset of the same size: {d['random_baseline_mean']:.2f} ± "
                f"{d['random_baseline_std']:.2f} %   ({len(self.accuracies)} models each, {self.seconds:.0f} s)")
        if "best_accuracy_mean" in d:
            text += (f"\n  best of test checkpoints (test-set selection, as the IDC/DANCE reference): synthetic "
                     f"{d['best_accuracy_mean']:.2f} ± {d['best_accuracy_std']:.2f} %")
            if "best_random_baseline_mean" in d:
                text += f", random subset {d['best_random_baseline_mean']:.2f} ± {d['best_random_baseline_std']:.2f} %"
        for key in ("set_labels", "baseline_labels"):
            if key in self.notes:
                text += f"\n  {key.replace('_', ' ')}: {self.notes[key]}"
        return text


@reuse_freed_memory()
def evaluate_synset(
    images: torch.Tensor,
    labels: torch.Tensor,
    train_set: Union[ImageDataset, LazyImageFolder],
    test_set: Union[ImageDataset, LazyImageFolder],
    cfg: EvalConfig,
    *,
    baseline_indices: Optional[torch.Tensor] = None,
    device: torch.device | str = "cpu",
    with_baseline: bool = True,
    progress: bool = True,
    ddp: bool = False,
) -> EvalResult:
    """Evaluate a synthetic set (images [N, C, H, W], labels [N]) against a same-size random real subset.

    ``baseline_indices`` [N] (training-set indices) fixes the baseline subset, e.g. the real images the
    set was initialised from; otherwise a class-balanced random subset with the same per-class counts is
    drawn from the evaluation generator. Both sides train ``cfg.num_models`` models with the same
    initialisations, all 2M at once. ``progress``: a tqdm bar over models x epochs (False: none).
    A class without images raises a ValueError unless ``cfg.allow_missing_classes``. ``cfg`` is first
    :meth:`~EvalConfig.resolved` for the test set's name and image size (the kd preset); the result's
    ``config`` is the resolved one.

    ``ddp`` (kd protocol only; inside a torchrun process group): every rank calls this with the same
    arguments; the students (set and baseline) train with DistributedDataParallel on each rank's share of
    every global batch (:func:`fit_stacked_kd`) and every rank returns the same result.
    """
    cfg = cfg.resolved(test_set.name, tuple(test_set.image_size))
    if ddp:
        if cfg.protocol != "kd":
            raise ValueError(f"ddp: only the kd protocol trains with DistributedDataParallel, got protocol "
                             f"{cfg.protocol!r}")
        dist_rank_world(True)
    device = torch.device(device)
    k = test_set.num_classes
    check_tensor("images", images, ndim=4, finite=True, nonempty=True)
    check_labels("labels", labels, k, length=images.shape[0])
    test_shape = (test_set.channels, *test_set.image_size)
    if tuple(images.shape[1:]) != test_shape:
        raise ValueError(f"images: shape {tuple(images.shape[1:])} per image does not match the dataset's "
                         f"{test_shape}")
    counts = torch.bincount(labels.reshape(-1).long().cpu(), minlength=k)
    if not cfg.allow_missing_classes and int(counts.min()) == 0:
        missing = [int(c) for c in torch.nonzero(counts == 0).flatten()]
        raise ValueError(f"labels: class {missing[0]} has no images (missing classes: {missing}); set "
                         "allow_missing_classes=True (--allow-missing-classes) to evaluate such a set")
    start = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    images = images.to(device, torch.float32)
    labels = labels.to(device, torch.long)
    m = cfg.num_models
    model_seeds = [cfg.seed * 1_000_003 + i for i in range(m)]
    sets_x, sets_y = [images.unsqueeze(0).expand(m, *images.shape)], [labels.unsqueeze(0).expand(m, -1)]
    seeds = list(model_seeds)
    if with_baseline:
        lazy_train = isinstance(train_set, LazyImageFolder)
        train = train_set if lazy_train else train_set.to(device)
        if baseline_indices is None:
            counts = torch.bincount(labels, minlength=k)
            if int(counts.min()) != int(counts.max()):
                raise ValueError("labels: the random baseline needs the same number of images per class "
                                 "(pass baseline_indices)")
            if lazy_train:  # the same draw as ClassSampler on the labels: only these files are decoded
                baseline_indices = train.sample_indices(int(counts[0]), generator).reshape(-1)
            else:
                sampler = ClassSampler(train.images, train.labels, k)
                baseline_indices = sampler.sample_indices(int(counts[0]), generator).reshape(-1)
        if lazy_train:
            baseline_indices = baseline_indices.cpu()
            bx, by = train.images_at(baseline_indices).to(device), train.labels[baseline_indices].to(device)
        else:
            baseline_indices = baseline_indices.to(device)
            bx, by = train.images[baseline_indices], train.labels[baseline_indices]
        sets_x.append(bx.unsqueeze(0).expand(m, *bx.shape))
        sets_y.append(by.unsqueeze(0).expand(m, -1))
        seeds += model_seeds  # paired initialisations
    if cfg.protocol == "kd" and cfg.soft_labels:
        return _evaluate_kd_stored(images, labels, bx if with_baseline else None, by if with_baseline else None,
                                   test_set, cfg, model_seeds=model_seeds, generator=generator, start=start,
                                   progress=progress, ddp=ddp)
    if with_baseline and bx.shape[0] != images.shape[0]:
        # different sizes cannot share one stacked mini-batch schedule: train them separately
        parts = [(sx, sy, model_seeds) for sx, sy in zip(sets_x, sets_y)]
    else:
        parts = [(torch.cat(sets_x), torch.cat(sets_y), seeds)]
    test_x, test_y = _test_tensors(test_set, device)
    accs = torch.cat([
        train_stacked(x, y, test_x, test_y, k, cfg, dataset_name=test_set.name, model_seeds=s, generator=generator,
                      progress=progress, protocol=cfg.protocol, ddp=ddp)
        for x, y, s in parts
    ])
    ckpts = None
    if accs.dim() == 2:  # per-checkpoint accuracies: the last column is the last epoch
        ckpts = (accs * 100).tolist()
        accs = accs[:, -1]
    accs = (accs * 100).tolist()
    return EvalResult(accuracies=accs[:m], baseline_accuracies=accs[m:], seconds=time.perf_counter() - start,
                      config=asdict(cfg), checkpoint_accuracies=None if ckpts is None else ckpts[:m],
                      baseline_checkpoint_accuracies=None if ckpts is None else ckpts[m:])


def _test_tensors(test_set, device):
    """``(images, labels)`` on ``device`` for an in-memory test set; a lazy one is passed on as itself (it is
    streamed by :func:`score_test_set`) with labels None."""
    if isinstance(test_set, LazyImageFolder):
        return test_set, None
    return test_set.images.to(device), test_set.labels.to(device)


def _evaluate_kd_stored(images, labels, base_x, base_y, test_set: ImageDataset, cfg: EvalConfig, *, model_seeds,
                        generator, start: float, progress: bool, ddp: bool = False) -> EvalResult:
    """:func:`evaluate_synset` for the kd protocol with ``cfg.soft_labels`` (module docstring): the set trains on
    the stored labels; the baseline (``base_x`` [N', C, H, W] or None) on the same replayed draws with the
    teacher online when N' = N, else with the online protocol."""
    from .relabel import RelabelStore
    from .teacher import load_teacher

    device, k, m = images.device, test_set.num_classes, len(model_seeds)
    store = RelabelStore(cfg.soft_labels)
    spec = cfg.teacher or store.meta.get("teacher", "")
    teacher = load_teacher(spec, images.shape[1], k, images.shape[2:], device)[0] if spec else None
    store.check_for(images, labels, epochs=cfg.epochs, batch_size=cfg.batch_size, teacher=teacher)
    rc = store.config
    notes = {"soft_labels": str(store.directory),
             "set_labels": f"stored soft labels ({store.directory}: first {cfg.epochs} of {store.epochs} epochs, "
                           f"batch {rc.batch_size}, {rc.crop} crop, {rc.mix} {rc.mix_alpha}, "
                           + (f"top-{rc.topk} folded at T0 = {rc.fold_temperature}" if rc.topk else "fp16 logits")
                           + "; no teacher queries)"}
    if rc.topk and rc.topk < k and cfg.temperature != rc.fold_temperature:
        notes["set_labels"] += (f"; the student's T = {cfg.temperature} differs from the fold's T0 = "
                                f"{rc.fold_temperature}: the folded rest mass is approximate")
    sources, online = [images], None
    if base_x is not None:
        if teacher is None:
            raise ValueError("teacher: the random baseline is labelled online (no soft labels are stored for it) "
                             "and neither the config nor the relabel directory names a teacher")
        if base_x.shape[0] == images.shape[0]:
            sources.append(base_x)
            notes["baseline_labels"] = ("teacher queried online on the same replayed batches, crops and mixes "
                                        "(no stored labels for the baseline; equal to relabelling it with the "
                                        "same seed)")
        else:
            notes["baseline_labels"] = (f"online KD protocol (the baseline has {base_x.shape[0]} images, the "
                                        f"stored labels cover {images.shape[0]})")
            online = dataclasses.replace(cfg, soft_labels="", teacher=spec)
    test_x, test_y = _test_tensors(test_set, device)
    accs = train_stacked_kd_stored(sources, store, test_x, test_y, k, cfg, model_seeds=model_seeds, teacher=teacher,
                                   progress=progress, ddp=ddp)
    if online is not None:
        accs = torch.cat([accs, train_stacked_kd(base_x.unsqueeze(0).expand(m, *base_x.shape),
                                                 base_y.unsqueeze(0).expand(m, -1), test_x, test_y, k, online,
                                                 model_seeds=model_seeds, generator=generator, progress=progress,
                                                 dataset_name=test_set.name, ddp=ddp)])
    accs = (accs * 100).tolist()
    return EvalResult(accuracies=accs[:m], baseline_accuracies=accs[m:], seconds=time.perf_counter() - start,
                      config=asdict(cfg), notes=notes)
