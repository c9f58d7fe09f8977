"""Guarded Triton import and small launch helpers shared by the kernel files.

Triton is Linux-only and optional: when it cannot be imported, ``triton.jit`` becomes a no-op
decorator so the kernel files still import (the PyTorch references keep working) and
``HAS_TRITON`` is False. Importing Triton never initialises CUDA or compiles anything; kernels
compile on their first launch.

``TRITON_INTERPRET=1`` must be in the environment before this module is first imported: Triton
decides at decoration time whether a kernel runs compiled or interpreted.
"""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install on an unsupported platform
    HAS_TRITON = False

    class _MissingTriton:
        """Stands in for ``triton``/``triton.language`` so kernel definitions still parse."""

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):
            return None

    triton = _MissingTriton()
    tl = _MissingTriton()

__all__ = [
    "HAS_TRITON",
    "triton",
    "tl",
    "interpreting",
    "next_pow2",
    "dot_upcast",
    "last_dim_contiguous",
    "flash_blocks",
]


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum); Triton block shapes must be powers of two."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands must be upcast to fp32 (with IEEE precision) for ``dtype``.

    fp32 inputs are upcast so the GPU uses IEEE fp32 rather than TF32 (scores must match the
    fp32 reference). The interpreter holds bf16 as raw 16-bit integers, so a bf16 dot there
    gives garbage unless the operands are upcast first. fp16/bf16 on a GPU use tensor cores.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take strides for every axis but the last, which must have stride 1."""
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_blocks(
    head_dim: int, dtype: torch.dtype, override: tuple[int, int] | None = None
) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for the flash-style attention kernels.

    Chosen from ptxas register reports for sm_90 (no spills, or a few bytes): IEEE fp32 dots
    and head_dim > 128 need small tiles; 64 x 32 tiles suit head_dim 128 in fp16/bf16.
    ``override`` (tests) replaces the tile shape.
    """
    if override is not None:
        return override[0], override[1], 4
    if dtype == torch.float32 or head_dim > 128:
        return 32, 32, 4
    return (64, 64, 4) if head_dim <= 64 else (64, 32, 4)
