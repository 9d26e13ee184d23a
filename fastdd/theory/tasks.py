"""Multi-index tasks y = g(U x) with x ~ N(0, I_d) (spec ``theory_kinoshita.md`` §6.1).

``U`` [r, d] has orthonormal rows (the first r rows of the Q of a QR of a Gaussian d x d matrix).
Two links (``LINKS`` registry):

* ``quadratic``: y = (zᵀ A z − tr A) / √2 with z = U x and A = sym(G) / ‖sym(G)‖_F, G Gaussian r x r.
  Information exponent 2 (E y = 0, E ∇y = 0, Hessian Uᵀ A U of rank r), Var y = 1.
* ``diag``: y = Σ_k [He2(z_k)/√(2r) + 0.5·He3(z_k)/√(6r)] (probabilists' Hermite polynomials), a
  target with a cubic part; Var y = 1.25.

Noise: ``noise`` · ε with ε ~ N(0, 1) (0 by default, as in the spec).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict

import torch

DTYPE = torch.float64


def _quadratic(z: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return (torch.einsum("ni,ij,nj->n", z, A, z) - torch.trace(A)) / math.sqrt(2.0)


def _diag(z: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    r = z.shape[1]
    he2 = z**2 - 1.0
    he3 = z**3 - 3.0 * z
    return (he2 / math.sqrt(2.0 * r) + 0.5 * he3 / math.sqrt(6.0 * r)).sum(dim=1)


LINKS: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "quadratic": _quadratic,
    "diag": _diag,
}


@dataclass
class MultiIndexTask:
    """A multi-index task: ``U`` [r, d] (orthonormal rows), ``A`` [r, r] (symmetric), link name, noise."""

    U: torch.Tensor
    A: torch.Tensor
    link: str = "quadratic"
    noise: float = 0.0

    @property
    def d(self) -> int:
        return self.U.shape[1]

    @property
    def r(self) -> int:
        return self.U.shape[0]

    def target(self, X: torch.Tensor) -> torch.Tensor:
        """Noise-free target g(U x) for X [n, d] -> [n]."""
        if X.ndim != 2 or X.shape[1] != self.d:
            raise ValueError(f"X must have shape [n, {self.d}], got {tuple(X.shape)}")
        return LINKS[self.link](X @ self.U.T, self.A)

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n fresh samples: X [n, d] ~ N(0, I_d), y [n] (plus noise if ``noise`` > 0)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        X = torch.randn(n, self.d, generator=gen, dtype=DTYPE)
        y = self.target(X)
        if self.noise > 0:
            y = y + self.noise * torch.randn(n, generator=gen, dtype=DTYPE)
        return X, y


def make_task(d: int, r: int, gen: torch.Generator, link: str = "quadratic", noise: float = 0.0) -> MultiIndexTask:
    """Draw U [r, d] (orthonormal rows) and A [r, r] from ``gen``; see the module docstring."""
    if link not in LINKS:
        raise ValueError(f"link must be one of {sorted(LINKS)}, got {link!r}")
    if not (1 <= r <= d):
        raise ValueError(f"need 1 <= r <= d, got r={r}, d={d}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DTYPE))
    U = Q[:, :r].T.contiguous()
    G = torch.randn(r, r, generator=gen, dtype=DTYPE)
    S = (G + G.T) / 2
    A = S / torch.linalg.norm(S)
    return MultiIndexTask(U=U, A=A, link=link, noise=noise)
