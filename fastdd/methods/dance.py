"""DANCE: Dual-View Distribution Alignment for Dataset Condensation (Zhang et al., IJCAI 2024).

Spec ``dm_dance.md`` §2.2-2.6. Needs pre-trained experts (``fastdd pretrain``, :mod:`fastdd.experts`).
Per iteration:

1. expert k ~ U{0..num_premodel-1} and lambda ~ U[0, 1) from the run generator; the middle encoder is
   ``theta_mid = lambda * theta_init_k + (1 - lambda) * theta_trained_k`` (all experts cached on the
   device once; the reference reloads two checkpoints from disk every iteration);
2. pixel storage: the stored tensor is clamped to [0, 1] (in place, as the reference);
3. inner-class phase, class by class: 128 real images of class c and the decoded synthetic images of
   class c (subsampled to ``batch_syn_max``) get ONE shared augmentation draw (IDC composition of
   ``match_strategy``, default ``color_crop_cutout``: color, crop and cutout all applied), are embedded by
   theta_mid (real side without autograd) and ``L_c = ||mean real emb - mean syn emb||^2``
   (:class:`fastdd.matchers.MMDMatcher`, linear) plus the add-on terms; one SGD step per class;
4. calibration phase (``iter_calib`` times), class by class: CE of the trained expert k on freshly
   augmented decoded synthetic images of class c; one SGD step per class.

``step_mode``:

* ``"per_class"`` (default, faithful): 2C optimiser steps per iteration as the reference. The SGD
  momentum buffer spans the whole tensor, so each step also moves every other class's images;
* ``"batched"``: one step on the summed inner loss of all classes (one batched forward, one draw per
  class) then one step on the summed calibration loss. NOT equivalent: 2 momentum updates per iteration
  instead of 2C, and all classes see the pre-step images.

``storage``:

* ``"pixel"`` (default, faithful): the stored tensor lives in [0, 1] pixel space, is clamped every
  iteration, and the dataset normalisation is applied inside the augmentation pipeline;
* ``"normalized"``: stored in the dataset's normalised space (as DM), never clamped.

``lr_img = 0`` (default) means the reference setting ``0.01 * ipc`` for the pixel storage; for
``"normalized"`` it is divided by std² of the first channel, which gives the same step per pixel: with
x = (p - m) / s the gradient is dL/dx = s dL/dp and a step lr_x dL/dx moves the pixel by s² lr_x dL/dp.
Any positive value is used as given.

Multi-formation ``factor`` f: every stored image decodes into f^2 training images (:func:`fastdd.idc.decode`);
with ``init="real"`` and f > 1 the stored images are mosaics of ``ipc * f^2`` real images per class
(:func:`fastdd.idc.mosaic`); ``init_order="first"`` (faithful) takes the first images of each class in
dataset order, ``"random"`` a random draw. ``init="noise"`` is N(0,1)/4 + 0.5 clamped to [0, 1] (pixel).

Low-rank plugin (``rank`` > 0): the stored images are the reconstruction ``A @ B`` of the factors (in the
storage space); the in-place clamp cannot act on factors, so for ``rank`` > 0 the clamp to [0, 1] is applied
in the forward pass (``torch.clamp`` on the reconstruction; zero gradient where it clips) and on export.

Saved set (:meth:`DANCE.synthetic_set`): ``images`` = the decoded training images in the dataset's
normalised space (ipc * f^2 per class, class-major) so ``fastdd evaluate`` works unchanged, ``labels``,
``stored_images`` (the stored tensor, in the storage space), ``stored_labels``; the config records
``factor`` and ``storage``.

Deviations from the reference (documented, not switchable): real batches are fresh random draws per
iteration (the reference cycles a per-class sampler without replacement); augmentation parameters come
from the run's torch.Generator (the reference uses numpy's global RNG); weight gradients of the
networks are not computed (the reference computes and discards them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.dataset import _stats_view
from ..experts import load_experts
from ..idc import IDCAugment, decode, mosaic
from ..matchers import MMDMatcher
from ..models import embed_with_taps, get_model
from .base import Method, MethodConfig
from .registry import register


@dataclass
class DANCEConfig(MethodConfig):
    """DANCE options; defaults are the reference's reproduce settings (factor 1 = IDC's CLI default;
    the README uses 2)."""

    experts: str = ""  # directory written by `fastdd pretrain` (required)
    num_premodel: int = 5  # experts sampled from (the first num_premodel of the directory)
    iterations: int = 10000
    batch_real: int = 128
    batch_syn_max: int = 200  # decoded synthetic images per class per step, at most
    iter_calib: int = 1
    factor: int = 1  # multi-formation factor f (f^2 decoded images per stored image)
    lr_img: float = 0.0  # 0: the reference's 0.01 * ipc (see module docstring)
    momentum_img: float = 0.5
    step_mode: str = "per_class"  # "per_class" (faithful, 2C steps) | "batched" (2 steps, not equivalent)
    storage: str = "pixel"  # "pixel" (faithful: [0,1], clamp each iteration) | "normalized"
    init_order: str = "first"  # real init: "first" images of each class in dataset order (faithful) | "random"
    match_strategy: str = "color_crop_cutout"  # augmentation of the inner-class matching and the calibration

    def effective_lr_img(self, std0: float = 1.0) -> float:
        if self.lr_img > 0:
            return self.lr_img
        base = 0.01 * self.ipc
        return base if self.storage == "pixel" else base / std0 ** 2

    def validate(self) -> None:
        import dataclasses as _dc

        if self.lr_img < 0:
            raise ValueError(f"lr_img: must be > 0 (or 0 for the default 0.01 * ipc), got {self.lr_img}")
        MethodConfig.validate(_dc.replace(self, lr_img=self.effective_lr_img()))
        if not self.experts:
            raise ValueError("experts: DANCE needs the directory of pre-trained experts "
                             "(`fastdd pretrain ... --out DIR`, then --experts DIR)")
        for name in ("num_premodel", "batch_syn_max", "iter_calib", "factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.step_mode not in ("per_class", "batched"):
            raise ValueError(f"step_mode: expected 'per_class' or 'batched', got {self.step_mode!r}")
        if self.storage not in ("pixel", "normalized"):
            raise ValueError(f"storage: expected 'pixel' or 'normalized', got {self.storage!r}")
        if self.init_order not in ("first", "random"):
            raise ValueError(f"init_order: expected 'first' or 'random', got {self.init_order!r}")


def interpolate_params(out: list, init: list, trained: list, lam: float) -> None:
    """In place: ``out[i] = lam * init[i] + (1 - lam) * trained[i]`` for every parameter tensor."""
    with torch.no_grad():
        for o, a, b in zip(out, init, trained):
            torch.lerp(b, a, lam, out=o)  # b + lam * (a - b)


@register("dance")
class DANCE(Method):
    """DANCE (see module docstring)."""

    config_cls = DANCEConfig

    def __init__(self, config: DANCEConfig, dataset, device="cpu"):
        config.validate()
        self.meta, pairs = load_experts(config.experts, config.num_premodel, device=device)
        super().__init__(config, dataset, device)
        ds = self.dataset
        for key, mine in (("num_classes", ds.num_classes), ("channels", ds.channels),
                          ("image_size", list(ds.image_size))):
            if self.meta[key] != mine:
                raise ValueError(f"experts: trained for {key}={self.meta[key]!r} but the dataset has {mine!r}")
        if config.model != self.meta["model"]:
            raise ValueError(f"model: {config.model!r} differs from the experts' architecture {self.meta['model']!r} "
                             f"(the mid encoder is built from the experts; pass --model {self.meta['model']})")
        self._mean = _stats_view(ds.mean, ds.images)
        self._std = _stats_view(ds.std, ds.images)
        lr = config.effective_lr_img(float(ds.std[0]))
        self.optimizer = torch.optim.SGD(self.synth.parameters(), lr=lr, momentum=config.momentum_img)
        g0 = torch.Generator().manual_seed(0)
        self.mid = get_model(self.meta["model"], ds.channels, self.num_classes, ds.image_size, generator=g0).to(self.device)
        self.expert = get_model(self.meta["model"], ds.channels, self.num_classes, ds.image_size, generator=g0).to(self.device)
        names = [n for n, _ in self.mid.named_parameters()]
        self.expert_init = [[sd[n] for n in names] for sd, _ in pairs]
        self.expert_trained = [[sd[n] for n in names] for _, sd in pairs]
        for net in (self.mid, self.expert):
            net.train()
            for p in net.parameters():
                p.requires_grad_(False)
        self.aug = IDCAugment(config.match_strategy) if config.dsa else None
        self.matcher = MMDMatcher(validate=False)  # labels checked once when the method is built
        self.decoded_per_class = self.images_per_class * config.factor ** 2
        self.decoded_labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(
            self.decoded_per_class)

    # ----------------------------------------------------------------------------------- images
    def _initial_images(self) -> torch.Tensor:
        """Stored images [K*n, C, H, W] in the storage space (see module docstring); n = images_per_class
        (``ipc``, or the low-rank plugin's count at the same storage)."""
        cfg = self.config
        n, f2 = self.images_per_class, cfg.factor ** 2
        if cfg.init == "noise":
            shape = (self.num_classes * n, *self.dataset.images.shape[1:])
            pix = (torch.randn(shape, generator=self.generator, device=self.device) / 4 + 0.5).clamp_(0, 1)
        else:
            counts = self.dataset.class_counts()
            if n * f2 > int(counts.min()):
                raise ValueError(f"ipc={cfg.ipc} with factor={cfg.factor} needs {n * f2} images of every class "
                                 f"for the real init, but class {int(counts.argmin())} of {self.dataset.name} has "
                                 f"only {int(counts.min())} images")
            if cfg.init_order == "first":
                idx = self.sampler.first_indices(n * f2)
            else:
                idx = self.sampler.sample_indices(n * f2, self.generator)
            self.init_indices = idx.reshape(-1).clone()
            pix = mosaic(self.dataset.denormalize(self.dataset.images[self.init_indices]), cfg.factor)
        return pix if cfg.storage == "pixel" else self.dataset.normalize(pix)

    def _initial_parameterisation(self) -> torch.nn.Module:
        """Plain: the stored tensor itself. Low-rank (``rank`` > 0): DANCE's own initial images (its
        mosaicked real images, or its N(0,1)/4 + 0.5 noise) projected onto the rank-r manifold, so that
        the reconstruction starts inside [0, 1] rather than as the base class's N(0, 1) factors, whose
        product would be clipped by the pixel clamp for most pixels."""
        if self.config.rank == 0:
            return super()._initial_parameterisation()
        from ..matchers.lowrank import LowRankImages

        return LowRankImages.from_real(self._initial_images(), self.config.rank)

    def _pad_value(self):
        return 0.5 if self.config.storage == "pixel" else ((0.5 - self._mean) / self._std).reshape(-1)

    def stored(self) -> torch.Tensor:
        """The stored tensor [K*ipc, C, H, W] (storage space; clamped in the forward for rank > 0)."""
        x = self.images
        if self.config.rank > 0 and self.config.storage == "pixel":
            x = x.clamp(0, 1)
        return x

    def to_network(self, stored: torch.Tensor) -> torch.Tensor:
        """Decode stored images [n, C, H, W] and map them to the normalised space: [n*f^2, C, H, W]."""
        x = decode(stored, self.config.factor, self._pad_value())
        return (x - self._mean) / self._std if self.config.storage == "pixel" else x

    def _clamp_(self) -> None:
        if self.config.storage == "pixel" and self.config.rank == 0:
            with torch.no_grad():
                self.synth.images.clamp_(0, 1)

    def _subsample(self, n: int) -> torch.Tensor | None:
        m = self.config.batch_syn_max
        if n <= m:
            return None
        return torch.randperm(n, generator=self.generator, device=self.generator.device)[:m].to(self.device)

    def _class_syn(self, c: int) -> torch.Tensor:
        """Decoded, normalised, subsampled synthetic images of class c (differentiable)."""
        n = self.images_per_class
        x = self.to_network(self.stored()[c * n:(c + 1) * n])
        keep = self._subsample(x.shape[0])
        return x if keep is None else x.index_select(0, keep)

    # ----------------------------------------------------------------------------------- losses
    def _embed(self, x):
        return embed_with_taps(self.mid, x) if self.needs_taps else (self.mid.embed(x), None)

    def inner_loss(self, real: torch.Tensor, syn: torch.Tensor, real_labels, syn_labels, num_groups: int,
                   addon_real=None, addon_syn_labels=None):
        """Inner-class loss of theta_mid: per-class MMD (+ add-ons). Classes are groups [0, num_groups)
        with one shared augmentation draw each. real [Nr, C, H, W] (no autograd), syn [Ns, C, H, W].

        ``addon_real`` = (embeddings, taps, class labels) of the real images of *all* classes, and
        ``addon_syn_labels`` the class labels of ``syn``: in the per-class step mode the add-ons (MIM4DD's
        contrastive term needs negatives from the other classes) compare the class's synthetic images
        with these instead of with the one class of the MMD term."""
        draws = None
        if self.aug is not None:
            draws = self.aug.draw(num_groups, self.generator, tuple(real.shape[-2:]), device=self.device)
        return self.inner_loss_drawn(real, syn, real_labels, syn_labels, num_groups, draws, addon_real,
                                     addon_syn_labels)

    def inner_loss_drawn(self, real, syn, real_labels, syn_labels, num_groups: int, draws, addon_real=None,
                         addon_syn_labels=None):
        """:meth:`inner_loss` given its augmentation ``draws`` (None: no augmentation): tensors only, no
        random draw and no host sync (compiles with ``torch.compile(fullgraph=True)``)."""
        if draws is not None:
            with torch.no_grad():
                real = self.aug.apply(real, draws, real_labels)
            syn = self.aug.apply(syn, draws, syn_labels)
        with torch.no_grad():
            real_emb, real_taps = self._embed(real)
        syn_emb, syn_taps = self._embed(syn)
        loss = self.matcher(real_emb, real_labels, syn_emb, syn_labels, num_groups)
        if self.addons:
            if addon_real is None:
                addon_real, addon_syn_labels = (real_emb, real_taps, real_labels), syn_labels
            loss = loss + self.addon_loss(*addon_real, syn_emb, syn_taps, addon_syn_labels)
        return loss

    @torch.no_grad()
    def _real_features_all(self, real: torch.Tensor, real_labels: torch.Tensor):
        """(embeddings, taps, labels) of the real images of every class under theta_mid, each class
        augmented with its own draw (for the add-ons in the per-class step mode)."""
        if self.aug is not None:
            draws = self.aug.draw(self.num_classes, self.generator, tuple(real.shape[-2:]), device=self.device)
            real = self.aug.apply(real, draws, real_labels)
        emb, taps = self._embed(real)
        return emb, taps, real_labels

    def calib_loss(self, syn: torch.Tensor, syn_labels: torch.Tensor, classes: torch.Tensor, num_groups: int):
        """Calibration: sum over groups of the mean CE of the trained expert on augmented syn images.
        ``syn_labels`` [Ns] are the group indices, ``classes`` [Ns] the class targets."""
        if self.aug is not None:
            draws = self.aug.draw(num_groups, self.generator, tuple(syn.shape[-2:]), device=self.device)
            syn = self.aug.apply(syn, draws, syn_labels)
        ce = F.cross_entropy(self.expert(syn), classes, reduction="none")
        counts = torch.bincount(syn_labels, minlength=num_groups).to(ce.dtype)
        return (torch.zeros(num_groups, dtype=ce.dtype, device=ce.device).index_add_(0, syn_labels, ce) / counts).sum()

    def set_mid(self, k: int, lam: float) -> None:
        """Load theta_mid(k, lam) into the middle encoder and theta_trained(k) into the expert."""
        interpolate_params(list(self.mid.parameters()), self.expert_init[k], self.expert_trained[k], lam)
        with torch.no_grad():
            for p, t in zip(self.expert.parameters(), self.expert_trained[k]):
                p.copy_(t)

    # ----------------------------------------------------------------------------------- one iteration
    def step(self) -> float:
        cfg = self.config
        gd = self.generator.device
        k = int(torch.randint(0, cfg.num_premodel, (1,), generator=self.generator, device=gd))
        lam = float(torch.rand((), generator=self.generator, device=gd))
        self.set_mid(k, lam)
        self._clamp_()
        real, real_labels = self.sampler.sample(cfg.batch_real, self.generator)
        K, nr = self.num_classes, cfg.batch_real
        total = 0.0
        if cfg.step_mode == "per_class":
            zeros_r = torch.zeros(nr, dtype=torch.long, device=self.device)
            addon_real = self._real_features_all(real, real_labels) if self.addons else None
            for c in range(K):
                syn = self._class_syn(c)
                zs = torch.zeros(syn.shape[0], dtype=torch.long, device=self.device)
                loss = self.inner_loss(real[c * nr:(c + 1) * nr], syn, zeros_r, zs, 1, addon_real,
                                       torch.full_like(zs, c))
                self.update(loss)
                total += float(loss.detach())
            for _ in range(cfg.iter_calib):
                for c in range(K):
                    syn = self._class_syn(c)
                    zs = torch.zeros(syn.shape[0], dtype=torch.long, device=self.device)
                    loss = self.calib_loss(syn, zs, torch.full_like(zs, c), 1)
                    self.update(loss, addons=False)
                    total += float(loss.detach())
            return total
        # batched: one step on the summed inner loss, then one per calibration round
        syn, syn_labels = self._all_syn()
        loss = self.inner_loss(real, syn, real_labels, syn_labels, K)
        self.update(loss)
        total += float(loss.detach())
        for _ in range(cfg.iter_calib):
            syn, syn_labels = self._all_syn()
            loss = self.calib_loss(syn, syn_labels, syn_labels, K)
            self.update(loss, addons=False)
            total += float(loss.detach())
        return total

    def _all_syn(self):
        """Decoded, normalised synthetic images of all classes, each class subsampled to batch_syn_max."""
        x = self.to_network(self.stored())  # [K * d, ...]
        d = self.decoded_per_class
        if d <= self.config.batch_syn_max:
            return x, self.decoded_labels
        keep = torch.cat([self._subsample(d) + c * d for c in range(self.num_classes)])
        return x.index_select(0, keep), self.decoded_labels.index_select(0, keep)

    # ----------------------------------------------------------------------------------- result
    @torch.no_grad()
    def decoded_images(self) -> torch.Tensor:
        """The training images [K*ipc*f^2, C, H, W] in normalised space (clamped for pixel storage)."""
        x = self.stored().detach()
        if self.config.storage == "pixel":
            x = x.clamp(0, 1)
        return self.to_network(x)

    def synthetic_set(self) -> dict:
        out = super().synthetic_set()
        stored = out.pop("images", None)
        out["images"] = self.decoded_images().float().cpu().contiguous()
        if stored is None or self.config.storage == "pixel":  # the clamped tensor that decodes to `images`
            stored = self.stored().detach().float().cpu()
            stored = stored.clamp(0, 1) if self.config.storage == "pixel" else stored
        out["stored_images"] = stored.contiguous()
        out["stored_labels"] = out["labels"]
        out["labels"] = self.decoded_labels.cpu()
        return out
