"""Density-peak clustering of token features (DPC-kNN), as SparseVLM v1.5 recycles tokens.

Pure functions on one set of tokens ``[M, D]``, vectorised on the device (no Python loop over
tokens, no host reads): an ``M x M`` distance matrix, then reductions over it.

The rule (Rodriguez & Laio's density peaks with a k-nearest-neighbour density, as SparseVLM's
``cluster_and_merge``): distances are Euclidean divided by ``sqrt(D)``; a token's density is
``exp(-mean of its squared distances to its k nearest tokens)`` (itself included, at distance 0);
its ``delta`` is the distance to the nearest denser token (the largest distance in the set for
the densest token); the ``n`` tokens with the largest ``density * delta`` are the centres; every
token joins its nearest centre (a centre always joins itself); a cluster's merged feature is the
plain mean of its members.

Deviation from the official code: it breaks density ties with random noise of size 1e-6; here
ties break by index (the earlier token counts as denser), so the result is deterministic. The
official ``+1e-6`` in the mean's denominator is dropped (every cluster has its centre).
"""

from __future__ import annotations

import torch


def _stable_desc(x: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``x`` descending, ties towards the earlier index."""
    return torch.sort(x, descending=True, stable=True).indices


@torch.no_grad()
def dpc_knn(x: torch.Tensor, n_clusters: int, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of ``x`` by density peaks with a kNN density.

    Args:
        x: ``[M, D]`` features (computed in float32).
        n_clusters: number of centres, ``1..M``.
        k: neighbours in the density (default ``n_clusters``, as SparseVLM).

    Returns:
        ``centres [n]`` (row indices of ``x``, by decreasing ``density * delta``) and
        ``labels [M]`` (the cluster, ``0..n-1``, of each row; ``labels[centres[i]] == i``).

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0]])
        >>> centres, labels = dpc_knn(x, 2)
        >>> sorted(centres.tolist()), labels.tolist()
        ([0, 3], [0, 0, 0, 1, 1])
    """
    m = x.shape[0]
    if not 1 <= n_clusters <= m:
        raise ValueError(f"dpc_knn: n_clusters={n_clusters} must be in 1..{m} (the number of tokens)")
    k = n_clusters if k is None else min(k, m)
    xf = x.detach().float()
    dist = torch.cdist(xf, xf) / xf.shape[1] ** 0.5
    near = torch.topk(dist, k, dim=1, largest=False).values
    density = torch.exp(-(near**2).mean(1))
    # j is denser than i: strictly higher density, or equal density and an earlier index
    idx = torch.arange(m, device=x.device)
    denser = (density.unsqueeze(0) > density.unsqueeze(1)) | (
        (density.unsqueeze(0) == density.unsqueeze(1)) & (idx.unsqueeze(0) < idx.unsqueeze(1))
    )
    delta = torch.where(denser, dist, dist.max()).min(1).values
    centres = _stable_desc(delta * density)[:n_clusters]
    labels = dist[:, centres].argmin(1)
    labels[centres] = torch.arange(n_clusters, device=x.device)
    return centres, labels


def cluster_means(x: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """``[n, D]`` plain mean of the rows of ``x`` in each cluster (float32 sums, ``x``'s dtype out).

    Example:
        >>> cluster_means(torch.tensor([[1.0], [3.0], [10.0]]), torch.tensor([0, 0, 1]), 2).tolist()
        [[2.0], [10.0]]
    """
    sums = torch.zeros(n_clusters, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, labels, x.float())
    counts = torch.bincount(labels, minlength=n_clusters).clamp(min=1).unsqueeze(1)
    return (sums / counts).to(x.dtype)
