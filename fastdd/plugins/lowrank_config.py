"""Config of the low-rank parameterisation plugin (spec ``lowrank_dwa_theory.md`` 1.1-1.3)."""
from __future__ import annotations

from dataclasses import dataclass

from ..validation import check_positive_int
from .registry import register_config

ROUNDINGS = ("code", "readme")


@dataclass
class LowRankConfig:
    """Fields of the low-rank plugin (flat, so they are CLI flags ``--rank``, ``--rank-rounding``)."""

    rank: int = 0  # low-rank plugin: 0 = plain images; r >= 1 = each channel stored as A[H,r] @ B[r,W]
    rank_rounding: str = "code"  # images per class at the same storage: "code" (reference) or "readme"


def validate_lowrank_config(cfg) -> None:
    """Check ``rank`` (int >= 0) and ``rank_rounding``."""
    check_positive_int("rank", cfg.rank, minimum=0)
    if cfg.rank_rounding not in ROUNDINGS:
        raise ValueError(f"rank_rounding: expected 'code' or 'readme', got {cfg.rank_rounding!r}")


register_config("lowrank", LowRankConfig, validate_lowrank_config)
