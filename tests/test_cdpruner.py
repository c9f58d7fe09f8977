"""CDPruner: the DPP building block against brute-force greedy, the official rule as a plain
reference on the captured input embeddings, keep accounting."""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import image_runs

import vtprune
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


def official_rule(x: torch.Tensor, text: torch.Tensor, k: int) -> list[int]:
    """The official ``encode_images`` selection for one image, written plainly (float32): cosine
    kernel, relevance = mean negative cosine to the text, min-max normalised, ``L = r S r``, the
    fast greedy loop with its Cholesky rows kept in a list."""
    xn = x.float() / x.float().norm(dim=-1, keepdim=True)
    similarity = xn @ xn.T
    tn = text.float() / text.float().norm(dim=-1, keepdim=True)
    relevance = (-(xn @ tn.T)).mean(-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    di2s = torch.diagonal(kernel).clone()
    cis: list[torch.Tensor] = []
    chosen: list[int] = []
    for _ in range(k):
        j = int(torch.argmax(di2s))
        chosen.append(j)
        c = torch.stack(cis) if cis else torch.zeros(0, x.shape[0])
        eis = (kernel[j] - torch.einsum("t,tn->n", c[:, j], c)) / torch.sqrt(di2s[j])
        cis.append(eis)
        di2s = di2s - eis**2
        di2s[j] = float("-inf")
    return sorted(chosen)


def _instruction(ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The row's real text tokens after its last image token (all its text if none follow)."""
    image = ids == tiny.IMAGE
    text = valid.bool() & ~image
    last = int(torch.nonzero(image).max()) if image.any() else -1
    after = text.clone()
    after[: last + 1] = False
    return after if after.any() else text


CASES = {
    "llava": dict(images=[1, 2, 0], sizes=None),
    "llava_next": dict(images=[1, 2], sizes=[(32, 64), (64, 64), (64, 32)]),
    "qwen2_vl": dict(images=[2, 1], sizes=[(16, 16), (8, 12), (12, 16)]),
}


def _run(model, kw, **opts):
    seen = {}

    def keep_input(module, args, kwargs):
        seen.setdefault("x", kwargs["inputs_embeds"])

    grab = model.model.language_model.register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with torch.no_grad(), vtprune.pruned(model, "cdpruner", **opts):
            model(**kw)  # the hook was registered first: it sees the unpruned inputs
            kept = vtprune.stats(model).selections["cdpruner"]
    finally:
        grab.remove()
    return seen["x"], kept


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("keep", [0.12, 0.06])  # below the kernel rank (hidden size 64)
def test_kept_set_equals_the_official_rule_on_the_input_embeddings(family, keep):
    """Per image (LLaVA-NeXT: over its whole patch sequence, newlines dropped as the official code
    drops them), the kept tokens are the official rule's choice on the language model's input
    embeddings, with the instruction tokens' input embeddings standing in for CLIP's text tower."""
    model = tiny.BUILDERS[family]()
    case = CASES[family]
    kw = tiny.inputs(family, model, case["images"], seed=21, sizes=case["sizes"])
    x, kept = _run(model, kw, keep=keep)
    newline = getattr(model.model, "image_newline", None)
    expected = [[] for _ in case["images"]]
    for row, pos in image_runs(kw["input_ids"]):
        k = int(keep * pos.numel() + 0.5)
        if newline is not None:  # candidates: the patch tokens
            pos = pos[~(x[row, pos] == newline).all(-1)]
        text = x[row, _instruction(kw["input_ids"][row], kw["attention_mask"][row])]
        expected[row] += pos[official_rule(x[row, pos], text, k)].tolist()
    assert [k.tolist() for k in kept] == [sorted(e) for e in expected]


@pytest.mark.parametrize(
    "family,sizes",
    [("llava", None), ("llava_next", [(64, 64), (32, 64), (48, 64)]), ("qwen2_vl", [(32, 32), (24, 40)])],
)
@pytest.mark.parametrize(
    "opts", [dict(keep=0.5), dict(keep=0.25, per_crop=True), dict(keep=0.11, quality="paper")]
)
def test_keep_target_within_two_percent_on_every_family(family, sizes, opts):
    model = tiny.BUILDERS[family]()
    n_images = len(sizes) if sizes else 3
    kw = tiny.inputs(family, model, [n_images], seed=13, sizes=sizes)
    with torch.no_grad(), vtprune.pruned(model, "cdpruner", **opts):
        model(**kw)
        got = vtprune.stats(model).keep_ratio
    assert abs(got - opts["keep"]) / opts["keep"] <= 0.02, (family, opts, got)


@pytest.mark.parametrize("family", sorted(CASES))
def test_prompt_ending_with_the_image_uses_the_text_before_it(family):
    """No instruction after the image: the relevance comes from all the row's text (Qwen: the
    vision-end token that follows the image), and the kept set is still the official rule's on it."""
    model = tiny.BUILDERS[family]()
    case = CASES[family]
    sizes = case["sizes"][:1] if case["sizes"] else None
    kw = tiny.inputs(family, model, [1], seed=22, sizes=sizes, post=[0])
    x, kept = _run(model, kw, keep=0.2)
    ((row, pos),) = image_runs(kw["input_ids"])
    k = int(0.2 * pos.numel() + 0.5)
    assert kept[0].numel() == k
    newline = getattr(model.model, "image_newline", None)
    if newline is not None:
        pos = pos[~(x[row, pos] == newline).all(-1)]
    text = x[row, _instruction(kw["input_ids"][row], kw["attention_mask"][row])]
    assert text.shape[0] > 0
    assert kept[0].tolist() == sorted(pos[official_rule(x[row, pos], text, k)].tolist())
