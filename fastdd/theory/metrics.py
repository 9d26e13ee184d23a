"""Metrics of the theory study: NMSE, subspace energy, principal-angle cosines."""
from __future__ import annotations

import torch


def nmse(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error of pred [n] against y [n], divided by the variance of y."""
    if pred.shape != y.shape:
        raise ValueError(f"pred and y must have the same shape, got {tuple(pred.shape)} and {tuple(y.shape)}")
    return float(((pred - y) ** 2).mean() / y.var())


def subspace_energy(M: torch.Tensor, U: torch.Tensor) -> float:
    """ρ = ‖M Uᵀ‖_F² / ‖M‖_F² for rows M [k, d] and U [r, d] with orthonormal rows (1 = inside span(Uᵀ))."""
    if M.shape[1] != U.shape[1]:
        raise ValueError(f"M and U must have the same number of columns, got {M.shape[1]} and {U.shape[1]}")
    return float((M @ U.T).pow(2).sum() / M.pow(2).sum())


def principal_cosines(X: torch.Tensor, U: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """Cosines of the principal angles between span(rows of X [m, d]) and span(Uᵀ), U [r, d].

    Returns the top min(rank X, r) cosines, descending ([k])."""
    Ux, S, _ = torch.linalg.svd(X.T, full_matrices=False)  # columns of Ux span the rows of X
    Q = Ux[:, S > tol * S.max()]
    cos = torch.linalg.svdvals(U @ Q)
    return cos[: min(Q.shape[1], U.shape[0])]
