"""Instruction relevance of visual tokens: pure functions from features and prompt embeddings.

A vision-stage method that conditions on the question (CDPruner's DPP quality, later SparseVLM's
raters) needs a score ``r [n]`` saying how relevant each visual token is to the instruction. At
the vision stage the prompt has not run through the language model yet, so the sources here read
the prompt's *input embeddings* (``ImageView.instruction_embeds``: the embedding-table rows of the
instruction tokens), which live in the same space as the projector outputs (``ImageView.features``):

* ``"tokens"`` (default): the mean over instruction tokens of each visual token's cosine to that
  token (CDPruner's formula, and what the OpenVINO port of CDPruner-Qwen computes);
* ``"last"``: the cosine to the last instruction token's embedding (the query position);
* ``"centroid"``: the cosine to the mean of the instruction embeddings.

The sign is a parameter (``negate``): CDPruner's official code uses ``-cos`` (observed to work for
CLIP-space relevance in LLaVA; see METHODS_NEXT.md section 8). Scores are min-max normalised over
the given tokens, as the official code does, into ``(0, 1]``.

The official CDPruner-LLaVA relevance comes from a **CLIP text tower** applied to the question.
That tower exists only where a checkpoint ships one: the HF LLaVA / LLaVA-NeXT / Qwen2-VL
checkpoints contain the vision tower and the language model, not CLIP's text encoder. vtprune
therefore uses the language model's own input embeddings of the instruction (the sources above)
as the substitute everywhere; no extra model is loaded.

Attention-row sources (the last instruction token's attention in the LLM) belong to prefill
stages, which read them from the decoder; they are not offered at the vision stage.
"""

from __future__ import annotations

import torch

SOURCES = ("tokens", "last", "centroid")


def cosine_to_instruction(features: torch.Tensor, text: torch.Tensor, source: str = "tokens") -> torch.Tensor:
    """``[n]`` raw (unnormalised, unsigned) cosine relevance of ``features [n, D]`` to ``text [m, D]``.

    ``source`` is one of :data:`SOURCES`; ``text`` must have at least one row. Float32, detached.

    Example:
        >>> f = torch.tensor([[1.0, 0], [0, 1]])
        >>> t = torch.tensor([[1.0, 0], [1.0, 1]])
        >>> [round(v, 3) for v in cosine_to_instruction(f, t, "tokens").tolist()]
        [0.854, 0.354]
        >>> [round(v, 3) for v in cosine_to_instruction(f, t, "last").tolist()]
        [0.707, 0.707]
        >>> [round(v, 3) for v in cosine_to_instruction(f, t, "centroid").tolist()]
        [0.894, 0.447]
    """
    if source not in SOURCES:
        raise ValueError(f"relevance source {source!r} is invalid; allowed: {', '.join(map(repr, SOURCES))}")
    fn = torch.nn.functional.normalize(features.detach().float(), dim=-1)  # scores are not differentiated
    t = text.detach().float()
    if source == "last":
        t = t[-1:]
    elif source == "centroid":
        t = t.mean(0, keepdim=True)
    tn = torch.nn.functional.normalize(t, dim=-1)
    return (fn @ tn.T).mean(-1)


def min_max(r: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation as the official CDPruner code: ``(r - min + 1e-6) / (max - min)``, so
    the least relevant token keeps a quality just above zero (a constant ``r`` maps to ``1``).

    Example:
        >>> [round(v, 3) for v in min_max(torch.tensor([2.0, 4.0, 3.0])).tolist()]
        [0.0, 1.0, 0.5]
        >>> bool(min_max(torch.tensor([2.0, 4.0]))[0] > 0)
        True
    """
    low, high = r.min(), r.max()
    return (r - low + 1e-6) / (high - low).clamp(min=1e-6)


def instruction_relevance(
    features: torch.Tensor, text: torch.Tensor, negate: bool = True, source: str = "tokens"
) -> torch.Tensor | None:
    """``[n]`` min-max normalised relevance of ``features [n, D]`` to the instruction ``text [m, D]``
    from ``source`` (negated as the official CDPruner code by default); ``None`` when there is no text.

    Example:
        >>> f = torch.tensor([[1.0, 0], [0, 1], [1, 1]])
        >>> [round(v, 3) for v in instruction_relevance(f, torch.tensor([[1.0, 0]]), negate=False).tolist()]
        [1.0, 0.0, 0.707]
        >>> [round(v, 3) for v in instruction_relevance(f, torch.tensor([[1.0, 0]])).tolist()]  # -cos
        [0.0, 1.0, 0.293]
        >>> instruction_relevance(f, f[:0]) is None
        True
    """
    if text.shape[0] == 0:
        return None
    r = cosine_to_instruction(features, text, source)
    return min_max(-r if negate else r)
