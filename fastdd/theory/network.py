"""Two-layer network and the layer-wise reference training (spec ``theory_kinoshita.md`` §6.1).

f(x) = Σ_j a_j σ(w_j·x + b_j), σ = softplus (σ' = sigmoid), width L (even).

* Init (:func:`init_network`): L/2 pairs share (w_j ~ Unif(S^{d-1}), b_j ~ N(0, 1)) with a_j = +1 for
  the first half and −1 for the second, so f ≡ 0 at init.
* Stage 1 (:func:`stage1_direction`, :func:`stage1`): one gradient step on W of the loss
  (1/2n) Σ_i (f(x_i) − y_i)², with weight decay that cancels W0. Since f ≡ 0 at init, the negative
  gradient is G_j = a_j (1/n) Σ_i y_i σ'(w_j·x_i + b_j) x_i, and W1 = rows of G normalised to unit norm
  (the step size drops out). Design choice [DERIVED]: a row with zero norm stays zero.
* Stage 2 (:func:`stage2`): fresh biases b2 ~ N(0, 1) (drawn by the caller, :func:`draw_biases`), features
  Φ = softplus(X W1ᵀ + b2), ridge a = (ΦᵀΦ/n + λ I)⁻¹ Φᵀ y / n, λ = 1e-3 by default. The dual form
  a = Φᵀ(ΦΦᵀ + nλ I)⁻¹ y is used when n < L (it is identical and differentiable in X and y).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tasks import DTYPE


@dataclass
class Network:
    """Initial two-layer network: W0 [L, d] (unit rows), b0 [L], signs a0 [L] (±1 in pairs)."""

    W0: torch.Tensor
    b0: torch.Tensor
    a0: torch.Tensor

    @property
    def width(self) -> int:
        return self.W0.shape[0]


@dataclass
class TrainedModel:
    """The trained network: W1 [L, d], stage-2 biases b2 [L], output weights a [L]."""

    W1: torch.Tensor
    b2: torch.Tensor
    a: torch.Tensor

    def features(self, X: torch.Tensor) -> torch.Tensor:
        """Φ = softplus(X W1ᵀ + b2), [n, L]."""
        return F.softplus(X @ self.W1.T + self.b2)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """f(X) [n] for X [n, d]."""
        return self.features(X) @ self.a


def init_network(d: int, width: int, gen: torch.Generator) -> Network:
    """Paired ±a init of a width-``width`` network on R^d (f ≡ 0); see the module docstring."""
    if width < 2 or width % 2:
        raise ValueError(f"width must be an even integer >= 2, got {width}")
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    half = width // 2
    w = torch.randn(half, d, generator=gen, dtype=DTYPE)
    w = w / w.norm(dim=1, keepdim=True)
    b = torch.randn(half, generator=gen, dtype=DTYPE)
    a0 = torch.cat([torch.ones(half, dtype=DTYPE), -torch.ones(half, dtype=DTYPE)])
    return Network(W0=torch.cat([w, w]), b0=torch.cat([b, b]), a0=a0)


def draw_biases(width: int, gen: torch.Generator) -> torch.Tensor:
    """Fresh stage-2 biases b2 ~ N(0, 1), [width]."""
    return torch.randn(width, generator=gen, dtype=DTYPE)


def network_output(net: Network, W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """f(X) [n] with first layer W [L, d], the init's biases and signs (used to check stage 1)."""
    return F.softplus(X @ W.T + net.b0) @ net.a0


def stage1_direction(net: Network, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """G [L, d] = a_j (1/n) Σ_i y_i σ'(w_j·x_i + b_j) x_i (the negative W-gradient at init).

    X [n, d] and y [n] may be a synthetic set (then G is differentiable in both)."""
    if X.ndim != 2 or X.shape[1] != net.W0.shape[1]:
        raise ValueError(f"X must have shape [n, {net.W0.shape[1]}], got {tuple(X.shape)}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"y must have shape [{X.shape[0]}], got {tuple(y.shape)}")
    s = torch.sigmoid(X @ net.W0.T + net.b0)  # [n, L]
    return net.a0[:, None] * ((s * y[:, None]).T @ X) / X.shape[0]


def normalise_rows(G: torch.Tensor, eps: float = 1e-300) -> torch.Tensor:
    """Rows (last dim) of G [..., L, d] scaled to unit norm (zero rows stay zero)."""
    return G / G.norm(dim=-1, keepdim=True).clamp_min(eps)


def stage1(net: Network, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """W1 [L, d] = normalise_rows(stage1_direction(net, X, y))."""
    return normalise_rows(stage1_direction(net, X, y))


def ridge(Phi: torch.Tensor, y: torch.Tensor, lam: float = 1e-3) -> torch.Tensor:
    """a [L] = (ΦᵀΦ/n + λI)⁻¹ Φᵀ y/n for Φ [n, L], y [n] (dual form when n < L)."""
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    n, L = Phi.shape
    if n < L:
        K = Phi @ Phi.T + n * lam * torch.eye(n, dtype=Phi.dtype)
        return Phi.T @ torch.linalg.solve(K, y)
    K = Phi.T @ Phi / n + lam * torch.eye(L, dtype=Phi.dtype)
    return torch.linalg.solve(K, Phi.T @ y / n)


def ridge_operator(Phi: torch.Tensor, lam: float = 1e-3) -> torch.Tensor:
    """M [L, n] with ridge(Φ, y) = M y, for Φ [n, L] with n < L (dual form)."""
    n = Phi.shape[0]
    K = Phi @ Phi.T + n * lam * torch.eye(n, dtype=Phi.dtype)
    return Phi.T @ torch.linalg.inv(K)


def stage2(W1: torch.Tensor, b2: torch.Tensor, X: torch.Tensor, y: torch.Tensor, lam: float = 1e-3) -> TrainedModel:
    """Closed-form ridge on the output weights with features softplus(X W1ᵀ + b2)."""
    model = TrainedModel(W1=W1, b2=b2, a=torch.zeros(W1.shape[0], dtype=W1.dtype))
    model.a = ridge(model.features(X), y, lam)
    return model


def train_layerwise(net: Network, b2: torch.Tensor, stage1_data, stage2_data, lam: float = 1e-3) -> TrainedModel:
    """Stage 1 on ``stage1_data`` = (X1, y1), then stage 2 on ``stage2_data`` = (X2, y2) with biases b2."""
    W1 = stage1(net, *stage1_data)
    return stage2(W1, b2, *stage2_data, lam=lam)
