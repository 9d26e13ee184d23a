"""DDM's intra-class diversity term L_ICD (spec ``ddm_mim4dd.md`` §1.6), vectorised over classes.

For the synthetic embeddings of one class, e [n, D] (n = images per class, after DSA):

    N_k(i) = the k nearest other samples of i (Euclidean distance on e, self excluded; not differentiated)
    m_i    = mean_{j in N_k(i)} e_j                       (neighbourhood centroid, *not* detached)
    KL_i   = sum_d p_i[d] (log p_i[d] - log q_i[d]),  log p_i = log_softmax(e_i),  log q_i = log_softmax(m_i)
    L_ICD(c) = -(1/n) sum_i KL_i   (``reduction="mean"``, the original script)
             = -sum_i KL_i         (``reduction="sum"``, the refactor's "paper" reproduction)

The total is the sum over classes; it is *minimised*, so the KL is maximised (diversity pushed up).
The original computes the KL on raw softmax probabilities; we use log_softmax (stable, same value).
All classes have the same n, so the whole computation is batched as [K, n, D]: one batched distance
matrix, one top-k, one batched matmul for the centroids (no Python loop over classes).
"""
from __future__ import annotations

import torch

from ..validation import check_tensor

K_RULES = ("code", "paper")
REDUCTIONS = ("mean", "sum")


def icd_k(rule: str, ipc: int) -> int:
    """Number of neighbours for ``ipc`` images per class: ``"code"`` -> 2 (hard-coded in the original
    script), ``"paper"`` -> round(0.2 * ipc) (the refactor's reading of the paper); both clamped to
    [1, ipc - 1]. Returns 0 when ipc < 2 (the term is undefined: no other sample in the class)."""
    if rule not in K_RULES:
        raise ValueError(f"icd_k_rule: expected one of {K_RULES}, got {rule!r}")
    if ipc < 2:
        return 0
    k = 2 if rule == "code" else int(round(0.2 * ipc))
    return max(1, min(k, ipc - 1))


def icd_loss(syn_emb: torch.Tensor, ipc: int, k: int, *, reduction: str = "mean") -> torch.Tensor:
    """L_ICD summed over classes (0-d; module docstring).

    syn_emb: [K*ipc, D] class-major (rows c*ipc .. (c+1)*ipc - 1 are class c, as ``Method.labels``);
    k in [1, ipc - 1]. Differentiable with respect to ``syn_emb`` (through p and through the centroids).
    """
    check_tensor("syn_emb", syn_emb, ndim=2, nonempty=True, dtypes=(torch.float16, torch.bfloat16, torch.float32,
                                                                    torch.float64))
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 2:
        raise ValueError(f"ipc: the intra-class diversity term needs at least 2 images per class, got {ipc!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= ipc - 1:
        raise ValueError(f"k: expected an int in [1, ipc - 1] = [1, {ipc - 1}], got {k!r}")
    n_rows, dim = syn_emb.shape
    if n_rows % ipc:
        raise ValueError(f"syn_emb: {n_rows} rows is not a multiple of ipc={ipc} (expected [K*ipc, D])")
    acc = torch.float64 if syn_emb.dtype == torch.float64 else torch.float32
    e = syn_emb.to(acc).reshape(n_rows // ipc, ipc, dim)  # [K, n, D]
    with torch.no_grad():
        dist = torch.cdist(e, e)  # [K, n, n]
        dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # self excluded
        nbr = dist.topk(k, dim=2, largest=False).indices  # [K, n, k]
        weights = torch.zeros_like(dist).scatter_(2, nbr, 1.0 / k)  # row i: 1/k on its neighbours
    centroids = torch.bmm(weights, e)  # [K, n, D], differentiable through e
    logp = torch.log_softmax(e, dim=2)
    logq = torch.log_softmax(centroids, dim=2)
    kl = (logp.exp() * (logp - logq)).sum(2)  # [K, n]
    per_class = kl.mean(1) if reduction == "mean" else kl.sum(1)
    return -per_class.sum()

