"""Model adapters: one small file per family. ``adapter_for(model)`` picks one by class name."""

from __future__ import annotations

from .base import Adapter, GridSegment, ImageLayout, ImageSpec
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    LlavaOnevisionAdapter,
    Qwen3VLAdapter,
)


def supported_models() -> list[str]:
    return [name for a in ADAPTERS for name in a.supported_classes]


def adapter_for(model) -> Adapter:
    """The adapter for ``model``, or a ``TypeError`` listing what is supported.

    Example:
        >>> adapter_for(object())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        TypeError: vtprune does not support object; supported: LlavaForConditionalGeneration, ...
    """
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    raise TypeError(
        f"vtprune does not support {type(model).__name__}; supported: {', '.join(supported_models())}"
    )


__all__ = ["Adapter", "GridSegment", "ImageLayout", "ImageSpec", "adapter_for", "supported_models"]
