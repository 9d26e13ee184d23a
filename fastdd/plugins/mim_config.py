"""Config of the MIM4DD add-on (:mod:`fastdd.methods.mim4dd`; every choice unverified, see there)."""
from __future__ import annotations

from dataclasses import dataclass

from .registry import register_config

FORMS = ("supcon", "nce")
LAYERS = ("all", "last")
POOLS = ("mean",)
HEADS = ("linear", "none")
LAYER_REDUCTIONS = ("sum", "mean")


@dataclass
class MIMConfig:
    """Fields of the "mim" add-on (flat ``mim_*`` names, CLI flags ``--mim-weight`` ...)."""

    mim_weight: float = 0.0  # weight of the mutual-information term; 0 = add-on off
    mim_temperature: float = 0.1  # InfoNCE temperature tau
    mim_form: str = "supcon"  # "supcon" (multi-positive InfoNCE) | "nce" (CRD binary critic)
    mim_layers: str = "all"  # "all" (every conv block's tap) | "last" (the embedding)
    mim_pool: str = "mean"  # global average pool of each tap before the head (flatten: infeasible)
    mim_head: str = "linear"  # "linear" (learned per-layer heads to mim_dim, L2-normalised) | "none"
    mim_dim: int = 128  # head output width
    mim_lr: float = 0.05  # SGD (momentum 0.9) learning rate of the heads
    mim_symmetric: bool = False  # also real anchors (both directions)
    mim_shared_head: bool = False  # one head per layer for both sides (default: separate real / syn heads)
    mim_layer_reduction: str = "sum"  # "sum" | "mean" over layers


def validate_mim_config(cfg) -> None:
    """Check the ``mim_*`` fields of a config (raises ``ValueError`` naming the field)."""
    if not cfg.mim_weight >= 0:
        raise ValueError(f"mim_weight: must be >= 0 (0 = off), got {cfg.mim_weight}")
    if not cfg.mim_temperature > 0:
        raise ValueError(f"mim_temperature: must be > 0, got {cfg.mim_temperature}")
    for name, allowed in (("mim_form", FORMS), ("mim_layers", LAYERS), ("mim_head", HEADS),
                          ("mim_layer_reduction", LAYER_REDUCTIONS)):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {getattr(cfg, name)!r}")
    if cfg.mim_pool not in POOLS:
        extra = (" (flattening the taps is not supported: 131k dims per 32x32 tap would need a 16.8M-parameter "
                 "head per layer)" if cfg.mim_pool == "flatten" else "")
        raise ValueError(f"mim_pool: expected one of {POOLS}, got {cfg.mim_pool!r}{extra}")
    if isinstance(cfg.mim_dim, bool) or not isinstance(cfg.mim_dim, int) or cfg.mim_dim < 1:
        raise ValueError(f"mim_dim: expected a positive int, got {cfg.mim_dim!r}")
    if not cfg.mim_lr > 0:
        raise ValueError(f"mim_lr: must be > 0, got {cfg.mim_lr}")


register_config("mim", MIMConfig, validate_mim_config)
