"""Fast kernels for visual-token pruning, each beside the PyTorch reference defining it.

Ops (Triton on CUDA, the reference elsewhere; see ``dispatch`` for the rules and the
``VTPRUNE_KERNELS`` switch; each is also a ``torch.ops.vtprune.*`` custom op so torch.compile
treats it as one opaque node):

- ``gather_rows``, ``gather_rows_rmsnorm`` (gather.py): token compaction of hidden states,
  cos/sin and KV cache, optionally fused with the next layer's RMSNorm.
- ``query_key_probs``, ``key_attention_colsum`` (attention_scores.py): attention
  probabilities for pruning scores without materialising the attention matrix.
- ``varlen_attention`` (ragged_attention.py): attention over packed rows of different lengths.
- ``visual_window_attention``, ``head_masked_attention`` (visual_attention.py): masked
  attention patterns for skipping visual computation.

Importing this package is cheap: it imports neither Triton nor the op modules, and never
initialises CUDA. Each op module (and Triton, guarded) is imported on first attribute access.

Example:
    >>> import torch, vtprune.kernels as K
    >>> K.gather_rows(torch.randn(1, 4, 8), torch.tensor([[3, 1]])).shape
    torch.Size([1, 2, 8])
"""

import importlib

_EXPORTS = {
    "gather_rows": "gather",
    "gather_rows_ref": "gather",
    "gather_rows_rmsnorm": "gather",
    "gather_rows_rmsnorm_ref": "gather",
    "query_key_probs": "attention_scores",
    "query_key_probs_ref": "attention_scores",
    "key_attention_colsum": "attention_scores",
    "key_attention_colsum_ref": "attention_scores",
    "varlen_attention": "ragged_attention",
    "varlen_attention_ref": "ragged_attention",
    "visual_window_attention": "visual_attention",
    "visual_window_attention_ref": "visual_attention",
    "head_masked_attention": "visual_attention",
    "head_masked_attention_ref": "visual_attention",
    "resolve_backend": "dispatch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
