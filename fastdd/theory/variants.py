"""The distillation variants A–D of spec §6.2, registered by name (``VARIANTS``, :func:`get_variant`).

Each variant turns a :class:`~fastdd.theory.setting.Setting` and a size ``m`` into a :class:`Outcome`:
the NMSE of the model trained through the same pipeline on the distilled data (matched init and, for
A and C, a fresh init W0' with fresh stage-2 biases), the NMSE of a same-size random real subset
through the same pipeline, the subspace energy and principal-angle cosines of the distilled inputs,
and the stored floats.

* ``A`` stage 1 only: gradient matching of the normalised stage-1 direction (GM-1); stage 2 uses the
  real n2 points. Inputs and labels initialised from random real samples, Adam, restarts run as one
  batch (Adam is element-wise, so they are independent), the restart with the lowest GM loss is kept.
  The matched direction is ``Setting.gm_target()``: G(D) on the n1 stage-1 points by default, or a
  population proxy (``StudyConfig.gm_target="population"``, a diagnostic). The distilled stage-1 rows lie in the
  span of the m points, so at small m the NMSE is limited by how well G(D) fixes span(Uᵀ). See the README.
* ``B`` stage 2 only: W1 from a stage 1 on ``n1_good`` real samples; inputs Uᵀg (or Gaussian, control);
  labels by the closed-form least squares y~ = lstsq(Φ_R M, y_R), M the ridge operator of the inputs.
* ``C`` joint performance matching: one set serves both stages; back-propagation through the normalised
  stage 1 and the closed-form (dual) ridge to the real-data MSE on fresh mini-batches of the stage-2 pool.
* ``D`` "+L" (H-L1): the L output weights of the full-data model are stored; W1 and b2 are not stored
  (W1 comes from stage 1, b2 from the seed), so this checks that L floats carry stage 2 exactly.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .metrics import principal_cosines, subspace_energy
from .network import TrainedModel, draw_biases, init_network, normalise_rows, ridge_operator, stage1, stage2
from .setting import Setting


@dataclass
class Outcome:
    """Result of distilling one set of size ``m``. NaN where a quantity does not apply."""

    variant: str
    m: int
    nmse: float
    nmse_fresh: float
    nmse_random: float
    energy: float
    cosines: List[float]
    memory: int
    loss: float
    seconds: float
    X: Optional[torch.Tensor] = field(default=None, repr=False)
    y: Optional[torch.Tensor] = field(default=None, repr=False)


@dataclass
class Variant:
    name: str
    description: str
    sizes: List[int]
    run: Callable[[Setting, int, torch.Generator], Outcome]


VARIANTS: Dict[str, Variant] = {}


def register(name: str, description: str, sizes: List[int]):
    def deco(fn):
        VARIANTS[name] = Variant(name, description, list(sizes), fn)
        return fn
    return deco


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {name!r}")
    return VARIANTS[name]


def _random_subset(s: Setting, m: int, gen: torch.Generator, pool: str = "X1"):
    X, y = (s.X1, s.y1) if pool == "X1" else (s.X2, s.y2)
    idx = torch.randperm(X.shape[0], generator=gen)[:m]
    return X[idx], y[idx]


def _batched_init(s: Setting, m: int, restarts: int, gen: torch.Generator):
    """``restarts`` independent random real subsets of size m: X [R, m, d], y [R, m]."""
    idx = torch.stack([torch.randperm(s.X1.shape[0], generator=gen)[:m] for _ in range(restarts)])
    return s.X1[idx].clone(), s.y1[idx].clone()


def _stage1_batched(s: Setting, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Stage-1 directions G [R, L, d] of R sets X [R, m, d], y [R, m]."""
    net = s.net
    sg = torch.sigmoid(X @ net.W0.T + net.b0)  # [R, m, L]
    return net.a0[None, :, None] * ((sg * y[..., None]).transpose(1, 2) @ X) / X.shape[1]


def _gm_loss(s: Setting, G: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-restart GM loss [R] between G [R, L, d] and the real direction ``target`` [L, d]."""
    if s.config.gm_norm == "global":
        Gn = G / G.flatten(1).norm(dim=1).clamp_min(1e-300)[:, None, None]
        Tn = target / target.norm()
        return (Gn - Tn).pow(2).flatten(1).sum(1)
    Gn = G / G.norm(dim=2, keepdim=True).clamp_min(1e-300)
    Tn = target / target.norm(dim=1, keepdim=True)
    return (1.0 - (Gn * Tn).sum(2)).mean(1)


def _fresh_pair(s: Setting, gen: torch.Generator):
    d = s.task.d
    return init_network(d, s.config.width, gen), draw_biases(s.config.width, gen)


def _input_stats(s: Setting, X: torch.Tensor):
    return subspace_energy(X, s.task.U), [float(c) for c in principal_cosines(X, s.task.U)]


def _stage1_masked(s: Setting, X: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Stage-1 directions G [R, L, d] of R padded sets X [R, M, d], y [R, M] with ``mask`` [R, M] (1 = a point).

    Padded points are zeroed (so they contribute nothing and get zero gradient); set r is averaged over its
    own size, so G[r] equals :func:`_stage1_batched` on the unpadded set."""
    Xm, ym = X * mask[..., None], y * mask
    return _stage1_batched(s, Xm, ym) * (X.shape[1] / mask.sum(1))[:, None, None]


def run_gm_sizes(s: Setting, sizes: List[int], gen: torch.Generator) -> List[Outcome]:
    """Variant A for every size in ``sizes`` in one optimisation: the ``len(sizes) x gm_restarts`` sets are
    padded to the largest size and optimised together. Adam is element-wise and padded entries get zero
    gradient (they stay 0), so each set follows exactly the trajectory of its own run; only the per-step
    Python overhead is shared. Random draws: all initial subsets (size by size, restart by restart), then
    per size the fresh init W0' and the random real subset."""
    t0 = time.perf_counter()
    cfg = s.config

    sizes = [int(m) for m in sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must be >= 1, got {sizes}")
    R, M, d = cfg.gm_restarts, max(sizes), s.task.d
    target = s.gm_target()
    X = torch.zeros(len(sizes) * R, M, d, dtype=s.X1.dtype)
    y = torch.zeros(len(sizes) * R, M, dtype=s.X1.dtype)
    mask = torch.zeros(len(sizes) * R, M, dtype=s.X1.dtype)
    for i, m in enumerate(sizes):
        Xi, yi = _batched_init(s, m, R, gen)
        X[i * R:(i + 1) * R, :m], y[i * R:(i + 1) * R, :m], mask[i * R:(i + 1) * R, :m] = Xi, yi, 1.0
    X.requires_grad_(True)
    y.requires_grad_(True)
    opt = torch.optim.Adam([X, y], lr=cfg.gm_lr)
    for _ in range(cfg.gm_steps):
        opt.zero_grad(set_to_none=True)
        _gm_loss(s, _stage1_masked(s, X, y, mask), target).sum().backward()
        opt.step()
    shared = (time.perf_counter() - t0) / len(sizes)
    out = []
    with torch.no_grad():
        losses = _gm_loss(s, _stage1_masked(s, X, y, mask), target)
        for i, m in enumerate(sizes):
            t1 = time.perf_counter()
            k = i * R + int(losses[i * R:(i + 1) * R].argmin())
            Xs, ys = X[k, :m].detach().clone(), y[k, :m].detach().clone()
            model = stage2(stage1(s.net, Xs, ys), s.b2, s.X2, s.y2, cfg.lam)
            net2, b2f = _fresh_pair(s, gen)
            fresh = stage2(stage1(net2, Xs, ys), b2f, s.X2, s.y2, cfg.lam)
            Xr, yr = _random_subset(s, m, gen)
            rand = stage2(stage1(s.net, Xr, yr), s.b2, s.X2, s.y2, cfg.lam)
            e, cos = _input_stats(s, Xs)
            out.append(Outcome("A", m, s.test_nmse(model), s.test_nmse(fresh), s.test_nmse(rand), e, cos,
                               m * (d + 1), float(losses[k]), shared + time.perf_counter() - t1, Xs, ys))
    return out


@register("A", "stage 1 only: gradient matching (GM-1), real stage 2", [1, 2, 3, 4, 6, 8, 12])
def run_gm(s: Setting, m: int, gen: torch.Generator) -> Outcome:
    """Variant A at one size m (:func:`run_gm_sizes` with ``[m]``)."""
    return run_gm_sizes(s, [m], gen)[0]


@register("B", "stage 2 only: label learning (closed form) on subspace inputs", [3, 4, 6, 8, 10, 12, 15, 20, 24, 32])
def run_labels(s: Setting, m: int, gen: torch.Generator) -> Outcome:
    t0 = time.perf_counter()
    cfg = s.config
    good = s.good_reference()
    W1, b2 = good.W1, good.b2
    PhiR = good.features(s.X2)
    best = None
    for _ in range(cfg.b_draws):
        if cfg.b_inputs == "subspace":
            Xs = torch.randn(m, s.task.r, generator=gen, dtype=s.X1.dtype) @ s.task.U
        else:
            Xs = torch.randn(m, s.task.d, generator=gen, dtype=s.X1.dtype)
        M = ridge_operator(F.softplus(Xs @ W1.T + b2), cfg.lam)  # [L, m]
        ys = torch.linalg.lstsq(PhiR @ M, s.y2[:, None]).solution[:, 0]
        loss = float(((PhiR @ (M @ ys) - s.y2) ** 2).mean())
        if best is None or loss < best[0]:
            best = (loss, Xs, ys, M @ ys)
    loss, Xs, ys, a = best
    model = TrainedModel(W1=W1, b2=b2, a=a)
    Xr, yr = _random_subset(s, m, gen, pool="X2")
    rand = stage2(W1, b2, Xr, yr, cfg.lam)
    e, cos = _input_stats(s, Xs)
    d = s.task.d
    return Outcome("B", m, s.test_nmse(model), math.nan, s.test_nmse(rand), e, cos, m * (d + 1), loss,
                   time.perf_counter() - t0, Xs, ys)


def _pm_predict(s: Setting, X: torch.Tensor, y: torch.Tensor, Xb: torch.Tensor) -> torch.Tensor:
    """Predictions [R, B] on real Xb [B, d] of the models trained (both stages) on X [R, m, d], y [R, m]."""
    W1 = normalise_rows(_stage1_batched(s, X, y))  # [R, L, d]
    PhiS = F.softplus(torch.einsum("rmd,rld->rml", X, W1) + s.b2)  # [R, m, L]
    m = X.shape[1]
    K = PhiS @ PhiS.transpose(1, 2) + m * s.config.lam * torch.eye(m, dtype=X.dtype)
    a = (PhiS.transpose(1, 2) @ torch.linalg.solve(K, y[..., None]))[..., 0]  # [R, L]
    PhiB = F.softplus(torch.einsum("bd,rld->rbl", Xb, W1) + s.b2)
    return torch.einsum("rbl,rl->rb", PhiB, a)


@register("C", "joint performance matching through both stages", [2, 3, 4, 6, 8, 12, 16, 24, 32])
def run_pm(s: Setting, m: int, gen: torch.Generator) -> Outcome:
    t0 = time.perf_counter()
    cfg = s.config
    X, y = _batched_init(s, m, cfg.pm_restarts, gen)
    X.requires_grad_(True)
    y.requires_grad_(True)
    opt = torch.optim.Adam([X, y], lr=cfg.pm_lr)
    n2 = s.X2.shape[0]
    var = s.y2.var()
    for _ in range(cfg.pm_steps):
        idx = torch.randint(n2, (min(cfg.pm_batch, n2),), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = ((_pm_predict(s, X, y, s.X2[idx]) - s.y2[idx]) ** 2).mean(1) / var
        loss.sum().backward()
        opt.step()
    with torch.no_grad():
        losses = ((_pm_predict(s, X, y, s.X2) - s.y2) ** 2).mean(1) / var
        k = int(losses.argmin())
        Xs, ys = X[k].detach().clone(), y[k].detach().clone()
        model = stage2(stage1(s.net, Xs, ys), s.b2, Xs, ys, cfg.lam)
        net2, b2f = _fresh_pair(s, gen)
        fresh = stage2(stage1(net2, Xs, ys), b2f, Xs, ys, cfg.lam)
        Xr, yr = _random_subset(s, m, gen)
        rand = stage2(stage1(s.net, Xr, yr), s.b2, Xr, yr, cfg.lam)
        e, cos = _input_stats(s, Xs)
    d = s.task.d
    return Outcome("C", m, s.test_nmse(model), s.test_nmse(fresh), s.test_nmse(rand), e, cos, m * (d + 1),
                   float(losses[k]), time.perf_counter() - t0, Xs, ys)


@register("D", "+L: store the L output weights of the full-data model", [0])
def run_store_a(s: Setting, m: int, gen: torch.Generator) -> Outcome:
    t0 = time.perf_counter()
    ref = s.reference
    stored = ref.a.detach().clone()  # the L floats that are stored
    W1 = stage1(s.net, s.X1, s.y1)   # recomputed, not stored
    model = TrainedModel(W1=W1, b2=s.b2, a=stored)
    v = s.test_nmse(model)
    return Outcome("D", m, v, math.nan, math.nan, math.nan, [], s.config.width, abs(v - s.nmse_ref) / s.nmse_ref,
                   time.perf_counter() - t0)
