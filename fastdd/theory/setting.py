"""One (d, r, seed) cell of the study: task, network, real data, reference models (spec §6.1, §6.3)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .metrics import nmse, subspace_energy
from .network import Network, TrainedModel, draw_biases, init_network, normalise_rows, stage1, stage1_direction, stage2
from .tasks import MultiIndexTask, make_task


@dataclass
class StudyConfig:
    """Every knob of the study. Defaults follow spec §6.1–§6.2; see ``fastdd.theory`` for the switches."""

    width: int = 512            # L
    link: str = "quadratic"     # "quadratic" | "diag"
    noise: float = 0.0
    n1_factor: float = 16.0     # full-data stage 1 uses n1 = n1_factor * d^2 samples
    n2: int = 4000              # real stage-2 samples
    n_test: int = 10000
    lam: float = 1e-3           # ridge λ
    n1_good: int = 100000       # variant B's "good" stage 1: max(n1_good, n1_good_factor * d^2) samples
    n1_good_factor: float = 40.0  # spec §6.4: at d = 64, 1e5 samples give rho ~ 0.65; use n1 >= 40 d^2
    gm_steps: int = 2000        # variant A (Adam)
    gm_lr: float = 0.02
    gm_restarts: int = 3
    gm_norm: str = "global"     # "global" (Frobenius-normalised G) | "per_neuron" (row-wise cosines)
    gm_target: str = "stage1"   # "stage1" (G(D) on the n1 stage-1 points) | "population" (diagnostic, n1_good points)
    pm_steps: int = 1000        # variant C (Adam)
    pm_lr: float = 0.01
    pm_batch: int = 512         # real points per PM step (fresh draw from the stage-2 pool)
    pm_restarts: int = 1
    b_draws: int = 3            # variant B: best of this many input draws
    b_inputs: str = "subspace"  # "subspace" (x = Uᵀg) | "gaussian" (control)

    def __post_init__(self) -> None:
        for name in ("width", "n2", "n_test", "n1_good", "gm_steps", "gm_restarts", "pm_steps",
                     "pm_batch", "pm_restarts", "b_draws"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gm_norm not in ("global", "per_neuron"):
            raise ValueError(f"gm_norm must be 'global' or 'per_neuron', got {self.gm_norm!r}")
        if self.gm_target not in ("stage1", "population"):
            raise ValueError(f"gm_target must be 'stage1' or 'population', got {self.gm_target!r}")
        if self.b_inputs not in ("subspace", "gaussian"):
            raise ValueError(f"b_inputs must be 'subspace' or 'gaussian', got {self.b_inputs!r}")
        if self.n1_factor <= 0:
            raise ValueError(f"n1_factor must be > 0, got {self.n1_factor}")
        if self.n1_good_factor < 0:
            raise ValueError(f"n1_good_factor must be >= 0, got {self.n1_good_factor}")


@dataclass
class Setting:
    """Task, init, data and full-data reference of one cell; all drawn from one seed."""

    task: MultiIndexTask
    net: Network
    b2: torch.Tensor
    X1: torch.Tensor
    y1: torch.Tensor
    X2: torch.Tensor
    y2: torch.Tensor
    Xt: torch.Tensor
    yt: torch.Tensor
    config: StudyConfig
    seed: int
    reference: TrainedModel = None
    _good: Optional[TrainedModel] = field(default=None, repr=False)
    _good_direction: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def nmse_ref(self) -> float:
        """NMSE of the full-data pipeline (n1 stage-1 samples, n2 stage-2 samples)."""
        return self.test_nmse(self.reference)

    @property
    def rho_ref(self) -> float:
        return subspace_energy(self.reference.W1, self.task.U)

    def test_nmse(self, model: TrainedModel) -> float:
        return nmse(model.predict(self.Xt), self.yt)

    @property
    def n1_good(self) -> int:
        """Stage-1 samples of variant B's good stage 1: max(n1_good, n1_good_factor·d²)."""
        d = self.task.d
        return max(self.config.n1_good, int(math.ceil(self.config.n1_good_factor * d * d)))

    def good_direction(self, chunk: int = 16384) -> torch.Tensor:
        """Stage-1 direction G [L, d] (before row normalisation) on :attr:`n1_good` fresh samples, cached.

        A proxy for the population gradient. It is accumulated over chunks of ``chunk`` samples (the [n, L]
        sigmoid matrix of 1.6e5 samples would take 0.7 GB); the result equals one pass up to rounding."""
        if self._good_direction is None:
            gen = torch.Generator().manual_seed(10_000 + self.seed)
            n = self.n1_good
            G = torch.zeros_like(self.net.W0)
            done = 0
            while done < n:  # chunk by chunk from one generator (reproducible from the seed)
                k = min(chunk, n - done)
                X, y = self.task.sample(k, gen)
                G += stage1_direction(self.net, X, y) * k
                done += k
            self._good_direction = G / n
        return self._good_direction

    def good_reference(self, chunk: int = 16384) -> TrainedModel:
        """Stage 1 on :attr:`n1_good` fresh samples (:meth:`good_direction`) + real stage 2: variant B's W1 and
        its reference, cached."""
        if self._good is None:
            W1 = normalise_rows(self.good_direction(chunk))
            self._good = stage2(W1, self.b2, self.X2, self.y2, self.config.lam)
        return self._good

    def gm_target(self) -> torch.Tensor:
        """The stage-1 direction variant A matches (``config.gm_target``): G(D) on the n1 stage-1 points
        (``"stage1"``, the full-data training being distilled) or :meth:`good_direction` (``"population"``,
        a diagnostic: it distils a better stage 1 than the full-data reference has)."""
        if self.config.gm_target == "population":
            return self.good_direction()
        return stage1_direction(self.net, self.X1, self.y1)


def make_setting(d: int, r: int, seed: int, config: Optional[StudyConfig] = None) -> Setting:
    """Draw task, network, stage-2 biases, n1 = n1_factor·d² stage-1 samples, n2 stage-2 samples and
    n_test test samples from ``torch.Generator().manual_seed(seed)``, and train the full-data reference."""
    cfg = config or StudyConfig()
    gen = torch.Generator().manual_seed(seed)
    task = make_task(d, r, gen, link=cfg.link, noise=cfg.noise)
    net = init_network(d, cfg.width, gen)
    b2 = draw_biases(cfg.width, gen)
    n1 = max(1, int(round(cfg.n1_factor * d * d)))
    X1, y1 = task.sample(n1, gen)
    X2, y2 = task.sample(cfg.n2, gen)
    Xt, yt = task.sample(cfg.n_test, gen)
    s = Setting(task, net, b2, X1, y1, X2, y2, Xt, yt, cfg, seed)
    s.reference = stage2(stage1(net, X1, y1), b2, X2, y2, cfg.lam)
    return s
