"""Dataset Condensation with gradient matching (DC; Zhao, Mopuri & Bilen, ICLR 2021) and its DSA
variant (Zhao & Bilen, ICML 2021), batched over classes (spec ``lowrank_dwa_theory.md`` 1.4).

Per outer iteration:

1. a fresh randomly initialised network (from the run's generator);
2. ``outer_loop`` times: draw ``batch_real`` real images per class; with DSA, one augmentation draw per
   class applied to that class's real and synthetic images; per class c the gradient of the mean
   cross-entropy w.r.t. the network's parameters on real (no graph) and on synthetic images (with a
   graph), loss = sum_c D(g_real_c, g_syn_c) (:func:`fastdd.matchers.gradient.gradient_distance`),
   one SGD step on the synthetic set; then, except after the last, ``inner_loop`` epochs of SGD
   (``lr_net``, batch ``batch_train``, DSA per sample) on the detached current set.

The per-class gradients come from ``torch.func.vmap(grad(...))`` over a ``[K, n, C, H, W]`` view
(one call per side) when ``batched_grads`` is on and the network treats samples independently
(instance / group / no norm); with batch norm, or ``batched_grads=False``, the reference's per-class loop
(:func:`per_class_gradients_loop`) is used. Both give the same values (tests, float64).
``batched_grads=None`` (default) batches on CUDA only: on CPUs the vmapped gradients measured 0.50-0.57x
the speed of the loop (``benchmarks/results/dc_iteration.md``, 2-core AMD EPYC, IPC 1, both shapes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ..matchers.gradient import DISTANCES, gradient_distance
from ..models import has_batchnorm, init_parameters
from .base import Method, MethodConfig
from .registry import register

#: (outer_loop, inner_loop) per ORIGINAL images per class, as the reference's ``get_loops``.
LOOPS: Dict[int, Tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15),
                                     50: (50, 10)}


def get_loops(ipc: int) -> Tuple[int, int]:
    """(outer_loop, inner_loop) for ``ipc`` original images per class (1, 10, 20, 30, 40 or 50)."""
    if ipc not in LOOPS:
        raise ValueError(f"ipc: no default (outer_loop, inner_loop) for ipc={ipc} (known: {sorted(LOOPS)}); "
                         "pass outer_loop and inner_loop explicitly")
    return LOOPS[ipc]


@dataclass
class DCConfig(MethodConfig):
    """DC options; defaults are the reference's (1000 iterations, lr_img 0.1, lr_net 0.01, 256 real/class)."""

    iterations: int = 1000
    lr_img: float = 0.1
    dsa: bool = False  # plain DC: no augmentation (the "dsa" method switches it on)
    lr_net: float = 0.01  # SGD learning rate of the inner-loop network training
    batch_train: int = 256  # mini-batch of the inner-loop network training
    outer_loop: int = 0  # 0: from get_loops(ipc) (the ORIGINAL ipc, also under --rank)
    inner_loop: int = -1  # -1: from get_loops(ipc)
    dis_metric: str = "ours"  # gradient distance: "ours" | "mse" | "cos"
    batched_grads: Optional[bool] = None  # vmap the per-class gradients (None: on CUDA only; loop with batch norm)

    def validate(self) -> None:
        super().validate()
        if self.dis_metric not in DISTANCES:
            raise ValueError(f"dis_metric: expected one of {sorted(DISTANCES)}, got {self.dis_metric!r}")
        if not self.lr_net > 0:
            raise ValueError(f"lr_net: must be > 0, got {self.lr_net}")
        if self.batch_train < 1:
            raise ValueError(f"batch_train: must be >= 1, got {self.batch_train}")
        if self.outer_loop < 0 or self.inner_loop < -1:
            raise ValueError("outer_loop / inner_loop: must be >= 0 (0 / -1: from ipc)")
        if self.outer_loop == 0 or self.inner_loop == -1:
            get_loops(self.ipc)

    def loops(self) -> Tuple[int, int]:
        """The effective (outer_loop, inner_loop)."""
        outer, inner = (self.outer_loop, self.inner_loop)
        if outer == 0 or inner == -1:
            d_outer, d_inner = get_loops(self.ipc)
            outer = outer or d_outer
            inner = d_inner if inner == -1 else inner
        return outer, inner


@dataclass
class DSAConfig(DCConfig):
    """DSA: DC with the siamese augmentation on (strategy color_crop_cutout_flip_scale_rotate)."""

    dsa: bool = True


def _ce_params(net, params, buffers, x, y):
    """Mean cross-entropy of ``net`` with ``params`` on ``x`` [n, C, H, W], labels ``y`` [n]."""
    return F.cross_entropy(functional_call(net, (params, buffers), (x,)), y)


def per_class_gradients_batched(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                                create_graph: bool) -> List[torch.Tensor]:
    """Per-class gradients of the mean CE, all classes in one vmapped call.

    ``x`` [K*n, C, H, W] class-major (n per class), ``y`` [K*n]. Returns one ``[K, *p.shape]`` tensor per
    parameter ``p`` of ``net`` (in ``named_parameters`` order). Needs a network whose samples are
    independent (no batch norm). ``create_graph``: keep the graph to ``x`` (synthetic side).
    """
    params = {k: p if create_graph else p.detach() for k, p in net.named_parameters()}
    buffers = dict(net.named_buffers())
    k = num_classes
    xs, ys = x.reshape(k, -1, *x.shape[1:]), y.reshape(k, -1)
    g = vmap(grad(lambda p, xx, yy: _ce_params(net, p, buffers, xx, yy)), in_dims=(None, 0, 0))(params, xs, ys)
    return [g[name] for name, _ in net.named_parameters()]


def per_class_gradients_loop(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                             create_graph: bool) -> List[torch.Tensor]:
    """The reference formulation: one forward/backward per class. Same output as the batched version."""
    params = list(net.parameters())
    per_class = []
    for c in range(num_classes):
        m = y == c
        loss = F.cross_entropy(net(x[m]), y[m])
        per_class.append(torch.autograd.grad(loss, params, create_graph=create_graph))
    return [torch.stack([g[i] for g in per_class]) for i in range(len(params))]


@register("dc")
class DC(Method):
    """Gradient matching (see module docstring); ``dsa`` is the same class with augmentation on."""

    config_cls = DCConfig

    def __init__(self, config: DCConfig, dataset, device="cpu"):
        super().__init__(config, dataset, device)
        self.outer_loop, self.inner_loop = config.loops()
        self.net = self._network()
        self.dsa = self._augmentation()
        batched = self.device.type == "cuda" if config.batched_grads is None else config.batched_grads
        self.batched = batched and not has_batchnorm(self.net)

    def gradients(self, x, y, create_graph):
        """Per-class gradients ``[K, *p.shape]`` per parameter (batched or the per-class loop)."""
        fn = per_class_gradients_batched if self.batched else per_class_gradients_loop
        return fn(self.net, x, y, self.num_classes, create_graph)

    def match_loss(self) -> torch.Tensor:
        """One image-update loss: sum over classes of D(g_real_c, g_syn_c), plus the add-ons."""
        cfg = self.config
        real, real_labels = self.sampler.sample(cfg.batch_real, self.generator)
        syn, syn_labels = self.images, self.labels
        if self.dsa is not None:
            draw = self.dsa.draw(self.num_classes, self.generator, self.dataset.image_size)
            with torch.no_grad():
                real = self.dsa.apply(real, draw, real_labels)
            syn = self.dsa.apply(syn, draw, syn_labels)
        g_real = [g.detach() for g in self.gradients(real, real_labels, create_graph=False)]
        g_syn = self.gradients(syn, syn_labels, create_graph=True)
        loss = gradient_distance(g_real, g_syn, cfg.dis_metric, batched=True).sum()
        if self.addons:
            with torch.no_grad():
                real_out = self._embed(real)
            syn_out = self._embed(syn)
            loss = loss + self.addon_loss(real_out[0], real_out[1], real_labels, syn_out[0], syn_out[1], syn_labels)
        return loss

    def _embed(self, x):
        if self.needs_taps:
            from ..models import embed_with_taps

            return embed_with_taps(self.net, x)
        return self.net.embed(x), None

    def train_net(self) -> None:
        """``inner_loop`` epochs of SGD on the detached current set (DSA per sample when on)."""
        cfg = self.config
        x_all, y_all = self.images.detach(), self.labels
        opt = torch.optim.SGD(self.net.parameters(), lr=cfg.lr_net)
        n = x_all.shape[0]
        for _ in range(self.inner_loop):
            order = torch.randperm(n, generator=self.generator, device=self.generator.device).to(self.device)
            for start in range(0, n, cfg.batch_train):
                idx = order[start:start + cfg.batch_train]
                x = x_all[idx]
                if self.dsa is not None:
                    x = self.dsa.per_sample(x, self.generator)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(self.net(x), y_all[idx]).backward()
                opt.step()

    def step(self) -> float:
        init_parameters(self.net, self.generator)
        total = 0.0
        for ol in range(self.outer_loop):
            total += self.update(self.match_loss())
            if ol == self.outer_loop - 1:
                break
            self.train_net()
        return total / self.outer_loop


@register("dsa")
class DSAMethod(DC):
    """DSA: :class:`DC` with the siamese augmentation switched on by default."""

    config_cls = DSAConfig
