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
trained on the set with a frozen BatchNorm teacher (``teacher``) queried online on every augmented,
MixUp-ed batch; the random baseline is trained with exactly the same protocol and teacher. With
``soft_labels`` (a ``fastdd relabel`` directory, :mod:`fastdd.relabel`) the students instead train on the
stored batches, crops and mixes against the stored logits, never querying the teacher (SRe2L's recipe,
:func:`train_stacked_kd_stored`); a same-size baseline replays the same draws on its own images with the
teacher queried online (no labels are stored for it), a baseline of another size trains online.

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
from typing import List, Optional, Sequence, Union

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
    """DM evaluation protocol options (reference defaults)."""

    model: str = "ConvNet"
    num_models: int = 5
    epochs: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    dsa_strategy: str = ""  # "" -> dataset default
    seed: int = 0
    test_batch_size: int = 0  # rows per test forward; 0: automatic (cache-sized on a CPU, 1000 on a GPU)
    faithful_epochs: bool = True
    vectorise: Optional[bool] = None  # None: vmap over stacked models on CUDA, a loop over models on CPU
    protocol: str = "dm"  # training loop, see PROTOCOLS ("dm" | "idc")
    cutmix_p: float = 0.0  # idc: CutMix probability
    eval_every: int = 0  # idc: test accuracy every K epochs (and at the end)
    allow_missing_classes: bool = False  # accept a set in which some class has no image
    compile: str = "auto"  # torch.compile of the training and test forwards: "auto" | "on" | "off"
    teacher: str = ""  # kd: teacher spec (squeeze DIR or resnet18:PATH; `fastdd evaluate`: the set's teacher)
    temperature: float = 30.0  # kd: softmax temperature of teacher and student
    t_squared: bool = False  # kd: multiply the KL by T^2 (DWA's Tiny-ImageNet recipe only)
    mixup_alpha: float = 0.0  # kd: MixUp Beta(alpha, alpha) inside each batch (0: off)
    kd_augment: str = "crop_flip"  # kd: per-sample augmentation: "crop_flip" (RandomCrop pad 4 + flip) | "none"
    teacher_train_mode: bool = False  # kd: teacher BN in train mode (the SRe2L/DWA CIFAR validator's quirk)
    soft_labels: str = ""  # kd: a `fastdd relabel` directory: train on its stored batches and soft labels
    workers: int = 0  # DataLoader workers: replaying stored batches (kd with soft_labels), decoding a lazy test split

    def validate(self) -> None:
        check_positive_int("workers", self.workers, minimum=0)
        if self.soft_labels and self.protocol != "kd":
            raise ValueError(f"soft_labels: stored soft labels need the kd protocol (--protocol kd), got {self.protocol!r}")
        if self.protocol == "kd":
            if self.kd_augment not in KD_AUGMENTS:
                raise ValueError(f"kd_augment: expected one of {list(KD_AUGMENTS)}, got {self.kd_augment!r}")
            if not self.temperature > 0:
                raise ValueError(f"temperature: must be > 0, got {self.temperature}")
            if not self.mixup_alpha >= 0:
                raise ValueError(f"mixup_alpha: must be >= 0, got {self.mixup_alpha}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        check_positive_int("num_models", self.num_models)
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("test_batch_size", self.test_batch_size, minimum=0)
        check_compile_mode(self.compile)
        check_positive_int("eval_every", self.eval_every, minimum=0)
        if not 0.0 <= self.cutmix_p <= 1.0:
            raise ValueError(f"cutmix_p: must lie in [0, 1], got {self.cutmix_p}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")


#: Named evaluation protocols: the EvalConfig fields each one sets (everything else keeps its default).
PROTOCOLS = {
    "dm": {},
    "idc": {"protocol": "idc", "epochs": 1500, "batch_size": 64, "cutmix_p": 0.5, "eval_every": 250},
    # SRe2L/DWA CIFAR post-training (relabel_cifar.py / validation_cifar.py): AdamW 1e-3, wd 0.01 on >1-d
    # tensors, cosine per epoch, batch 128, RandomCrop(4) + flip, MixUp 0.8, online teacher at T = 30, no T^2
    "kd": {"protocol": "kd", "epochs": 400, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.01, "dsa": False,
           "temperature": 30.0, "mixup_alpha": 0.8, "kd_augment": "crop_flip"},
}

KD_AUGMENTS = ("crop_flip", "none")


def protocol_config(name: str, **overrides) -> EvalConfig:
    """The EvalConfig of protocol ``name`` ("dm" or "idc"), with ``overrides`` applied on top."""
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
            self.params, self.buffers = stack_module_state(self.models)
            self.base = copy.deepcopy(self.models[0]).to("meta")

            def call(p, b, x):
                return functional_call(self.base, (p, b), (x,))

            self._train_fn = torch.vmap(call, in_dims=(0, 0, 0))
            self._shared_fn = torch.vmap(call, in_dims=(0, 0, None))

    def parameters(self) -> List[torch.Tensor]:
        if self.vectorised:
            return list(self.params.values())
        return [p for m in self.models for p in m.parameters()]

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
            return self._train_fn(self.params, self.buffers, x)
        return torch.stack([self._one(i, xi) for i, xi in enumerate(x)])

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """One input batch x [B, ...] for every model -> logits [M, B, K]."""
        if self.vectorised:
            return self._shared_fn(self.params, self.buffers, x)
        if self.channels_last and x.dim() == 4 and not torch.is_grad_enabled():
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.stack([self._one(i, x) for i in range(len(self.models))])


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
) -> torch.Tensor:
    """Train M = len(model_seeds) fresh models, model m on ``train_images[m]``, with the training loop of
    ``protocol`` (module docstring; ``cfg.protocol`` is not consulted); return test accuracies: [M] after
    the last epoch ("dm", and "kd" through :func:`train_stacked_kd`), or [M, P] at the P checkpoints
    ("idc": every ``eval_every`` epochs and the last epoch).

    train_images [M, N, C, H, W] (may be an expanded view of one set), train_labels [M, N],
    test_images [T, C, H, W], test_labels [T]. Accuracies are fractions in [0, 1]. ``progress``: a tqdm
    bar over models x epochs.
    """
    if protocol == "kd":
        return train_stacked_kd(train_images, train_labels, test_images, test_labels, num_classes, cfg,
                                model_seeds=model_seeds, generator=generator, progress=progress)
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


@reuse_freed_memory()
def train_stacked_kd(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                     test_labels: torch.Tensor, num_classes: int, cfg: EvalConfig, *, model_seeds: Sequence[int],
                     generator: torch.Generator, progress: bool = False) -> torch.Tensor:
    """The soft-label KD protocol (:mod:`fastdd.kd`) for M stacked students; returns test accuracies [M].

    Every epoch (lr cosine per epoch, AdamW with decay on >1-d tensors only), every model's shuffled
    mini-batch is augmented per sample (``kd_augment``), mixed (``mixup_alpha``), labelled by the frozen
    teacher ``cfg.teacher`` on exactly that input, and the students minimise the KL at ``temperature``.
    The set's hard labels are not used. Shapes as :func:`train_stacked`."""
    from .crops import random_crop_flip
    from .kd import adamw_groups, cosine_epoch_lr, kd_loss, mixup_groups
    from .teacher import load_teacher

    device = train_images.device
    m_models, n = train_images.shape[:2]
    chw = tuple(train_images.shape[2:])
    teacher, _ = load_teacher(cfg.teacher, chw[0], num_classes, chw[1:], device)
    teacher.train(cfg.teacher_train_mode)
    net = fresh_models(cfg, model_seeds, chw[0], num_classes, chw[1:], device,
                       calls=_work(m_models, n, cfg.epochs, test_images, checkpoints=1))
    optimizer = torch.optim.AdamW(adamw_groups(net.parameters(), cfg.weight_decay), lr=cfg.lr)
    rows = torch.arange(m_models, device=device).unsqueeze(1)
    with _progress(m_models * cfg.epochs, progress, f"evaluate {m_models} models (kd)") as bar:
        for epoch in range(cfg.epochs):
            for group in optimizer.param_groups:
                group["lr"] = cosine_epoch_lr(cfg.lr, epoch, cfg.epochs)
            net.train(True)
            for idx in epoch_batches(m_models, n, cfg.batch_size, generator, device):  # [M, b]
                x = train_images[rows, idx]  # [M, b, C, H, W]
                b = idx.shape[1]
                if cfg.kd_augment == "crop_flip":
                    x = random_crop_flip(x.reshape(m_models * b, *chw), generator).view(m_models, b, *chw)
                x = mixup_groups(x, generator, cfg.mixup_alpha)
                with torch.no_grad():
                    soft = teacher(x.reshape(m_models * b, *chw)).view(m_models, b, num_classes)
                loss = kd_loss(net(x), soft, cfg.temperature, cfg.t_squared)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            bar.update(m_models)
    return score_test_set(net, test_images, test_labels, cfg)


@reuse_freed_memory()
def train_stacked_kd_stored(sources: Sequence[torch.Tensor], store, test_images: torch.Tensor,
                            test_labels: torch.Tensor, num_classes: int, cfg: EvalConfig, *,
                            model_seeds: Sequence[int], teacher: Optional[torch.nn.Module] = None,
                            progress: bool = False) -> torch.Tensor:
    """SRe2L's post-training from stored soft labels (:mod:`fastdd.relabel`) for M = len(model_seeds)
    students per source; returns test accuracies [S * M] (source-major).

    ``sources[0]`` is the distilled set [N, C, H, W], replayed by a :class:`~fastdd.relabel.ReplayDataset`
    with its stored logits; every further source (same N, e.g. the random baseline) replays the same
    batches, crops and mixes on its own images, labelled online by ``teacher`` (eval mode) and rounded as
    the store rounds (fp16, the same top-k fold). All S * M students see their source's batch sequence of
    the first ``cfg.epochs`` stored epochs (AdamW, cosine per epoch, KL at ``temperature``)."""
    from .kd import adamw_groups, cosine_epoch_lr, kd_loss
    from .relabel import decode_logits, encode_logits, replay_loader

    device = test_images.device if isinstance(test_images, torch.Tensor) else sources[0].device
    m_models = len(model_seeds)
    chw = tuple(sources[0].shape[1:])
    workers = cfg.workers
    loaders = [replay_loader(x.cpu() if workers else x, store, with_labels=s == 0, num_workers=workers)
               for s, x in enumerate(sources)]
    net = fresh_models(cfg, list(model_seeds) * len(sources), chw[0], num_classes, chw[1:], device,
                       calls=_work(m_models * len(sources), sources[0].shape[0], cfg.epochs, test_images, 1))
    optimizer = torch.optim.AdamW(adamw_groups(net.parameters(), cfg.weight_decay), lr=cfg.lr)
    rc = store.config
    if teacher is not None:
        teacher.eval()
    total = m_models * len(sources)
    with _progress(total * cfg.epochs, progress, f"evaluate {total} models (kd, stored labels)") as bar:
        for epoch in range(cfg.epochs):
            for group in optimizer.param_groups:
                group["lr"] = cosine_epoch_lr(cfg.lr, epoch, cfg.epochs)
            net.train(True)
            for _, sampler in loaders:
                sampler.set_epoch(epoch)
            for batches in zip(*(loader for loader, _ in loaders)):
                xs, softs = [], []
                for x, soft in batches:
                    x = x.to(device)
                    if soft is None:
                        with torch.no_grad():
                            soft = decode_logits(encode_logits(teacher(x), rc.topk, rc.fold_temperature), num_classes)
                    xs.append(x.unsqueeze(0).expand(m_models, *x.shape))
                    softs.append(soft.to(device).unsqueeze(0).expand(m_models, *soft.shape))
                loss = kd_loss(net(torch.cat(xs)), torch.cat(softs), cfg.temperature, cfg.t_squared)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            bar.update(total)
    return score_test_set(net, test_images, test_labels, cfg)


def default_test_batch(images: torch.Tensor) -> int:
    """Rows per test forward when ``test_batch_size`` is 0: 1000 on a GPU; on a CPU the cache-sized chunk
    of :func:`fastdd.methods.dm.default_real_chunk` (for a 1x28x28 / 3x32x32 ConvNet-3)."""
    if images.device.type != "cpu":
        return 1000
    return cache_rows(128 * 32 * 32 * 4)


@torch.no_grad()
def accuracy_stacked(net: StackedModels, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Test accuracy [M] of every stacked model on images [T, C, H, W] with labels [T], in chunks of
    ``batch_size`` rows (0: :func:`default_test_batch`); every chunk goes through all models before the next."""
    net.train(False)
    batch_size = batch_size or default_test_batch(images)
    correct = None
    for start in range(0, images.shape[0], batch_size):
        logits = net.shared(images[start:start + batch_size])
        hits = (logits.argmax(-1) == labels[start:start + batch_size]).sum(-1)
        correct = hits if correct is None else correct + hits
    return correct.double() / images.shape[0]


def score_test_set(net: StackedModels, images: Union[torch.Tensor, LazyImageFolder],
                   labels: Optional[torch.Tensor], cfg: EvalConfig) -> torch.Tensor:
    """Test accuracy [M]: :func:`accuracy_stacked` for a tensor ``images`` [T, C, H, W] with ``labels`` [T];
    :func:`accuracy_stream` for a :class:`~fastdd.data.LazyImageFolder` (its own labels; ``labels`` unused),
    with ``cfg.test_batch_size`` rows per batch and ``cfg.workers`` DataLoader workers."""
    if isinstance(images, torch.Tensor):
        return accuracy_stacked(net, images, labels, cfg.test_batch_size)
    return accuracy_stream(net, images, cfg.test_batch_size, cfg.workers)


@torch.no_grad()
def accuracy_stream(net: StackedModels, dataset, batch_size: int = 0, workers: int = 0) -> torch.Tensor:
    """Test accuracy [M] of every stacked model on a map-style dataset of ``(image [C, H, W], label)``
    (a :class:`~fastdd.data.LazyImageFolder`), read in order through a ``DataLoader`` with ``workers``
    processes and ``batch_size`` rows per batch (0: :func:`fastdd.data.lazy.default_stream_batch`); every
    batch goes through all models before the next, as in :func:`accuracy_stacked`."""
    from .data.lazy import default_stream_batch, make_loader

    device = net.parameters()[0].device
    net.train(False)
    loader = make_loader(dataset, batch_size or default_stream_batch(device), workers, device)
    correct, total = None, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        hits = (net.shared(x).argmax(-1) == y).sum(-1)
        correct = hits if correct is None else correct + hits
        total += y.shape[0]
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
) -> EvalResult:
    """Evaluate a synthetic set (images [N, C, H, W], labels [N]) against a same-size random real subset.

    ``baseline_indices`` [N] (training-set indices) fixes the baseline subset, e.g. the real images the
    set was initialised from; otherwise a class-balanced random subset with the same per-class counts is
    drawn from the evaluation generator. Both sides train ``cfg.num_models`` models with the same
    initialisations, all 2M at once. ``progress``: a tqdm bar over models x epochs (False: none).
    A class without images raises a ValueError unless ``cfg.allow_missing_classes``.
    """
    cfg.validate()
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
                                   progress=progress)
    if with_baseline and bx.shape[0] != images.shape[0]:
        # different sizes cannot share one stacked mini-batch schedule: train them separately
        parts = [(sx, sy, model_seeds) for sx, sy in zip(sets_x, sets_y)]
    else:
        parts = [(torch.cat(sets_x), torch.cat(sets_y), seeds)]
    test_x, test_y = _test_tensors(test_set, device)
    accs = torch.cat([
        train_stacked(x, y, test_x, test_y, k, cfg, dataset_name=test_set.name, model_seeds=s, generator=generator,
                      progress=progress, protocol=cfg.protocol)
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
                        generator, start: float, progress: bool) -> EvalResult:
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
                                   progress=progress)
    if online is not None:
        accs = torch.cat([accs, train_stacked_kd(base_x.unsqueeze(0).expand(m, *base_x.shape),
                                                 base_y.unsqueeze(0).expand(m, -1), test_x, test_y, k, online,
                                                 model_seeds=model_seeds, generator=generator, progress=progress)])
    accs = (accs * 100).tolist()
    return EvalResult(accuracies=accs[:m], baseline_accuracies=accs[m:], seconds=time.perf_counter() - start,
                      config=asdict(cfg), notes=notes)
