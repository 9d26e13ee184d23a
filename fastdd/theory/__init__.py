"""Theory check: dataset distillation of multi-index tasks for two-layer networks.

A numerical test of the abstract of Kinoshita, Nishikawa & Toyoizumi (2026, arXiv 2603.14830):
distillation with gradient-based algorithms, on a width-L two-layer network learning a multi-index
task (input dimension d, intrinsic dimension r), encodes the task's subspace into the distilled points
and reproduces a well-generalising model at a memory of Θ~(r²d + L). The paper's body could not be read
(spec ``theory_kinoshita.md`` §0): its algorithm is unknown, and everything here is **our design**
(spec §6, tagged [DERIVED]), not the paper's.

Modules (torch and numpy only; float64 on the CPU; every random draw from an explicit Generator):

* :mod:`.tasks`    the multi-index tasks (quadratic link with random symmetric A; He2 + He3 "diag").
* :mod:`.network`  the two-layer softplus network with paired ±a init (f ≡ 0), one normalised stage-1
  gradient step on W, fresh biases and closed-form ridge on a.
* :mod:`.metrics`  NMSE, subspace energy ρ / E_U, principal-angle cosines against span(Uᵀ).
* :mod:`.setting`  :class:`StudyConfig` and one (d, r, seed) cell with its full-data reference.
* :mod:`.variants` the registry of distillation variants A–D (spec §6.2).
* :mod:`.study`    m*, log-log slopes and the pass criteria P1–P6 (spec §6.4).

Choices where the spec is unverified or silent, each a switch of :class:`StudyConfig`:

* Activation softplus (a smooth σ, needed for input gradients through σ'); not switchable.
* Stage 1 re-normalises the rows of W (the step size drops out); stage 2 draws fresh biases.
* GM loss ``gm_norm``: ``"global"`` (default, Frobenius-normalised G(S) vs G(D), spec §2.3 GM-1) or
  ``"per_neuron"`` (mean of 1 − row-wise cosine, the DC style). The ±a_j sign is kept, as stage 1 uses it.
* GM matches the finite-sample real gradient G(D) on the n1 stage-1 points with W0 fixed (shared with
  evaluation); a fresh W0' is evaluated separately (P5). ``gm_target``: ``"stage1"`` (default, G(D): the
  full-data training that is distilled) or ``"population"`` (a diagnostic: the stage-1 direction of the
  max(1e5, 40 d²) fresh points of variant B's good stage 1). With ``"stage1"``, at (d, r) = (16, 2) and
  m ≤ 4, A stays at 2.8–6.9× the full-data NMSE (best m per seed, seeds 0–4), short of issue 13's 2×: its m ≤ 4
  points give a stage 1 of rank ≤ 4 whose tilt from span(Uᵀ) is fixed by the sampling noise of G(D) (principal
  cosines ≈ 0.991–0.993, while 2× needs ≈ 0.9985). With ``"population"`` it reaches 0.3–0.6×. Measured per
  seed in the README's theory section.
* Variant C uses fresh mini-batches of ``pm_batch`` real points per step (spec: the real-data loss; a
  full 4000-point pass per step would be ~8x slower) and ``pm_restarts`` restarts (spec: none stated).
* Variant B's good stage 1 uses max(``n1_good``, ``n1_good_factor``·d²) = max(1e5, 40 d²) samples (spec §6.4:
  1e5 samples give ρ ≈ 0.65 at d = 64), accumulated in chunks.
* Variant B's inputs ``b_inputs``: ``"subspace"`` (x = Uᵀg, spec default) or ``"gaussian"`` (control).
* Variant D stores the L output weights of the full-data model (H-L1); W1 is recomputed by stage 1
  and b2 regenerated from the seed, so D isolates the "+L" term and is a consistency check by design.
* Ridge uses its dual form when the set is smaller than L (identical solution, differentiable).
* Memory: M = m·(d + 1) floats per point set (inputs and labels), L for variant D.
"""
from .metrics import nmse, principal_cosines, subspace_energy
from .network import (
    Network,
    TrainedModel,
    draw_biases,
    init_network,
    network_output,
    ridge,
    stage1,
    stage1_direction,
    stage2,
    train_layerwise,
)
from .setting import Setting, StudyConfig, make_setting
from .study import criteria, loglog_slope, m_star, threshold
from .tasks import LINKS, MultiIndexTask, make_task
from .variants import VARIANTS, Outcome, get_variant

__all__ = [
    "LINKS", "MultiIndexTask", "make_task", "Network", "TrainedModel", "init_network", "draw_biases",
    "network_output", "stage1_direction", "stage1", "stage2", "ridge", "train_layerwise", "nmse",
    "subspace_energy", "principal_cosines", "StudyConfig", "Setting", "make_setting", "VARIANTS",
    "Outcome", "get_variant", "m_star", "threshold", "loglog_slope", "criteria",
]
