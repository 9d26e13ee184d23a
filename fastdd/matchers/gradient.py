"""Gradient-matching distances of DC / DSA (spec ``lowrank_dwa_theory.md`` 1.4).

A "gradient" here is the list of per-parameter gradient tensors of a network. Three distances between
a real-side list ``g_real`` and a synthetic-side list ``g_syn`` (same shapes, tensor by tensor):

* ``"ours"`` (the reference default): per tensor, reshape to ``(out, -1)`` and sum over rows of
  ``1 - <r, s> / (|r| |s| + 1e-6)``; 1-D tensors (biases, norm scales) contribute 0; summed over tensors.
* ``"mse"``: squared L2 distance of the concatenated flattened gradients (every tensor included).
* ``"cos"``: ``1 - <r, s> / (|r| |s| + 1e-6)`` of the concatenated flattened gradients.

Every function also accepts a leading batch dimension ``B`` on all tensors (per-class gradients
computed at once, shape ``[B, *param.shape]``) with ``batched=True`` and then returns ``[B]``.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch

EPS = 1e-6


def _rows(g: torch.Tensor, batched: bool) -> torch.Tensor:
    """``g`` [*shape] (or [B, *shape]) reshaped to rows ``[out, -1]`` (or ``[B, out, -1]``)."""
    lead = 1 if batched else 0
    return g.reshape(*g.shape[:lead + 1], -1)


def layer_distance_ours(g_real: torch.Tensor, g_syn: torch.Tensor, batched: bool = False) -> torch.Tensor:
    """The reference's per-tensor ``distance_wb``: sum over rows of 1 - cos; 0 for 1-D tensors.

    Shapes: ``g_real``, ``g_syn`` [*param.shape] (or [B, *param.shape]); returns a 0-d tensor (or [B]).
    """
    if g_real.shape != g_syn.shape:
        raise ValueError(f"g_syn: shape {tuple(g_syn.shape)} differs from g_real's {tuple(g_real.shape)}")
    if g_real.dim() - (1 if batched else 0) <= 1:
        return g_syn.new_zeros(g_syn.shape[:1] if batched else ())
    r, s = _rows(g_real, batched), _rows(g_syn, batched)
    cos = (r * s).sum(-1) / (r.norm(dim=-1) * s.norm(dim=-1) + EPS)
    return (1 - cos).sum(-1)


def _ours(g_real, g_syn, batched):
    return sum(layer_distance_ours(r, s, batched) for r, s in zip(g_real, g_syn))


def _flat(gs, batched):
    return torch.cat([g.reshape(g.shape[0], -1) if batched else g.reshape(-1) for g in gs], dim=-1)


def _mse(g_real, g_syn, batched):
    return ((_flat(g_syn, batched) - _flat(g_real, batched)) ** 2).sum(-1)


def _cos(g_real, g_syn, batched):
    r, s = _flat(g_real, batched), _flat(g_syn, batched)
    return 1 - (r * s).sum(-1) / (r.norm(dim=-1) * s.norm(dim=-1) + EPS)


#: Registered gradient distances, by the reference's ``dis_metric`` names.
DISTANCES: Dict[str, Callable] = {"ours": _ours, "mse": _mse, "cos": _cos}


def gradient_distance(g_real: Sequence[torch.Tensor], g_syn: Sequence[torch.Tensor], metric: str = "ours",
                      batched: bool = False) -> torch.Tensor:
    """Distance ``metric`` ("ours" | "mse" | "cos") between two gradient lists (see module docstring).

    Returns a 0-d tensor, or ``[B]`` with ``batched=True`` (every tensor then has a leading ``B``).
    """
    if metric not in DISTANCES:
        raise ValueError(f"metric: expected one of {sorted(DISTANCES)}, got {metric!r}")
    g_real, g_syn = list(g_real), list(g_syn)
    if len(g_real) != len(g_syn) or not g_real:
        raise ValueError(f"g_syn: expected {len(g_real)} gradient tensors (non-empty), got {len(g_syn)}")
    return DISTANCES[metric](g_real, g_syn, batched)
