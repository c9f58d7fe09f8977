"""Choose between the Triton kernel and the PyTorch reference of an op.

Rules, first match wins:

1. ``VTPRUNE_KERNELS=reference`` in the environment forces the reference everywhere (a global
   switch for debugging numerics; it overrides ``backend="triton"``).
2. ``backend="reference"`` forces the reference for that call.
3. ``backend="triton"`` (or ``VTPRUNE_KERNELS=triton``) requires Triton: all tensors on CUDA,
   or on CPU with ``TRITON_INTERPRET=1`` (how the tests run kernels); otherwise RuntimeError.
4. ``backend=None``/``"auto"``: Triton when Triton imports and every tensor is on CUDA, else
   the reference. CPU tensors therefore use the reference by default, even when interpreting.

Importing this module imports neither Triton nor CUDA; ``resolve_backend`` looks at Triton
only when a tensor could use it.
"""

import functools
import importlib.util
import os

import torch

ENV_VAR = "VTPRUNE_KERNELS"
BACKENDS = ("auto", "triton", "reference")

__all__ = ["ENV_VAR", "BACKENDS", "resolve_backend", "triton_importable"]


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    """Whether Triton imports. Called by the op modules, which have already tried the import."""
    if importlib.util.find_spec("triton") is None:
        return False
    from ._triton import HAS_TRITON

    return HAS_TRITON


def _check(value: str, what: str) -> str:
    if value not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {value!r}")
    return value


def resolve_backend(*tensors: torch.Tensor | None, backend: str | None = None) -> str:
    """Return ``"triton"`` or ``"reference"`` for an op called on ``tensors``.

    Example:
        >>> import torch
        >>> resolve_backend(torch.zeros(2), backend=None)
        'reference'
    """
    env = _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")
    requested = _check(backend if backend is not None else "auto", "backend")
    if env == "reference" or requested == "reference":
        return "reference"
    if requested == "auto" and env == "triton":
        requested = "triton"
    devices = {t.device.type for t in tensors if t is not None}
    on_cuda = devices == {"cuda"}
    if requested == "auto":
        return "triton" if on_cuda and triton_importable() else "reference"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not triton_importable():
        raise RuntimeError("backend='triton' was requested but Triton is not installed")
    if on_cuda or (interpret and devices <= {"cpu"}):
        return "triton"
    raise RuntimeError(
        f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
        f"got tensors on {sorted(devices)}"
    )
