"""CDPruner: the DPP building block against brute-force greedy, the official rule as a plain
reference on the captured input embeddings, keep accounting."""

from __future__ import annotations

import pytest
import torch

from vtprune.diversity import dpp_greedy_map


def brute_greedy(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP written plainly: each step adds the item maximising ``log det`` of the chosen
    submatrix (float64, recomputed from scratch)."""
    chosen: list[int] = []
    for _ in range(k):
        best, arg = float("-inf"), -1
        for j in range(kernel.shape[0]):
            if j not in chosen:
                idx = torch.tensor(chosen + [j])
                value = float(torch.logdet(kernel[idx][:, idx].double()))
                if value > best:
                    best, arg = value, j
        chosen.append(arg)
    return sorted(chosen)


@pytest.mark.parametrize("n,k,d", [(9, 4, 5), (40, 12, 20), (70, 24, 48)])
def test_fast_greedy_map_equals_brute_greedy_on_random_psd_kernels(n, k, d):
    g = torch.Generator().manual_seed(n)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    s = x @ x.T  # PSD, rank min(n, d) > k
    q = torch.rand(n, generator=g) + 0.05
    assert dpp_greedy_map(s, q, k).tolist() == brute_greedy(q[:, None] * s * q[None], k)
    assert dpp_greedy_map(s, None, k).tolist() == brute_greedy(s, k)


def test_fast_greedy_map_past_the_rank_returns_k_distinct_indices():
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    got = dpp_greedy_map(x @ x.T, torch.rand(30), 20)
    assert got.numel() == 20 and got.unique().numel() == 20
