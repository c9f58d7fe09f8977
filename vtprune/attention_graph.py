"""Attention-graph importance (Zero-TPrune's I-stage) and its similarity pruning (S-stage).

The attention map of one layer, averaged over heads, is read as the adjacency matrix of a
directed graph: query ``i`` gives the share ``A[i, j]`` of its importance to key ``j``. Weighted
PageRank spreads importance along it from the uniform start, ``s <- A^T s``, so a token is
important when important tokens attend to it. No CLS token is needed, which makes it a score
for towers without one (Qwen2-VL) as well as a tower-stage method (``vtprune.methods.zerotprune``).

Everything here works on one image at a time: :func:`head_mean_attention` builds the
``[n, n]`` map one head at a time, so at most one head's map sits beside the running mean.
Scores only choose which tokens survive, so nothing here is differentiated.
"""

from __future__ import annotations

import torch

#: ``score=`` of the vision methods that read a tower score (HiRED, VisionZip): ``"attention"``
#: (the CLS row, or the received-attention substitute) or ``"wpr"`` (:func:`weighted_pagerank`)
TOWER_SCORES = ("attention", "wpr")

#: Weighted PageRank steps when a caller does not choose (the power iteration of a row-stochastic
#: map settles well within this on tower maps; a fixed count keeps batched and looped runs equal)
DEFAULT_ITERATIONS = 30


@torch.no_grad()
def head_mean_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``[n, n]`` float32: ``mean_h softmax(q_h k_h^T * scale)`` of one image.

    ``q``/``k`` ``[H, n, d]`` are the layer's queries and keys (rotary applied where the tower
    applies it); rows are queries. Heads are added one at a time.

    Example:
        >>> q = torch.zeros(2, 3, 4); k = torch.randn(2, 3, 4)
        >>> head_mean_attention(q, k, 0.5)[0].tolist()  # a zero query attends uniformly
        [0.3333333432674408, 0.3333333432674408, 0.3333333432674408]
    """
    n = q.shape[1]
    out = torch.zeros(n, n, dtype=torch.float32, device=q.device)
    for h in range(q.shape[0]):
        out += torch.softmax(q[h].float() @ k[h].float().T * scale, dim=-1)
    return out / q.shape[0]


@torch.no_grad()
def weighted_pagerank(attn: torch.Tensor, iterations: int = DEFAULT_ITERATIONS) -> torch.Tensor:
    """``[n]`` importance of each token: ``s <- attn^T s`` ``iterations`` times from ``1/n``.

    ``attn`` ``[n, n]`` is row-stochastic (queries by keys), so the scores keep summing to 1.

    Example:
        >>> a = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
        >>> [round(x, 3) for x in weighted_pagerank(a, 5).tolist()]  # everyone attends to token 1
        [0.0, 1.0, 0.0]
    """
    n = attn.shape[0]
    s = torch.full((n,), 1.0 / n, dtype=torch.float32, device=attn.device)
    attn_t = attn.float().T
    for _ in range(iterations):
        s = attn_t @ s
    return s


@torch.no_grad()
def importance_then_similarity(
    scores: torch.Tensor, keys: torch.Tensor, keep: int, similarity: float
) -> torch.Tensor:
    """``[n]`` bool: the ``keep`` tokens Zero-TPrune's two stages leave of ``n`` candidates.

    Of the ``r = n - keep`` to drop, the S-stage drops ``r_s = min(r, round(similarity * keep),
    keep - 1)`` and the I-stage the other ``r - r_s``:

    * I-stage: the ``r - r_s`` lowest ``scores`` leave;
    * S-stage: the ``m = keep + r_s`` survivors, sorted by score (highest first, ties by
      position), split sequentially into ``A`` (the first ``floor(m / 2)``) and ``B`` (the rest);
      each token of ``B`` gets its largest cosine similarity of ``keys`` to ``A``, and the ``r_s``
      most similar leave (ties: the less important first). ``r_s < keep`` leaves ``B`` a token
      more than it drops, so the similarity always chooses.

    Example:
        >>> scores = torch.tensor([0.4, 0.3, 0.2, 0.1])
        >>> keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [0.0, -1.0]])
        >>> importance_then_similarity(scores, keys, 3, 0.0).tolist()  # importance alone
        [True, True, True, False]
        >>> importance_then_similarity(scores, keys, 3, 1.0).tolist()  # 2 repeats 0: it leaves
        [True, True, False, True]
    """
    n = scores.numel()
    keep = max(0, min(keep, n))
    r = n - keep
    r_s = max(0, min(r, int(similarity * keep + 0.5), keep - 1))
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    survivors = order[: n - (r - r_s)]  # the I-stage's drops are the tail of the order
    out = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if r_s == 0:
        out[survivors] = True
        return out
    m = survivors.numel()
    a, b = survivors[: m // 2], survivors[m // 2 :]
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    best = (unit[b] @ unit[a].T).max(dim=1).values  # [|B|]
    # most similar first; among equals the less important (later in B) leaves first
    ranked = torch.sort(best.flip(0), descending=True, stable=True).indices
    gone = b.flip(0)[ranked[:r_s]]
    out[survivors] = True
    out[gone] = False
    return out
