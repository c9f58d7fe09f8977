"""The transformers versions vtprune is wired against (checked at import, with a clear message)."""

from __future__ import annotations

MIN_TRANSFORMERS = (5, 0)


def _parse(v: str) -> tuple[int, ...]:
    parts = []
    for piece in v.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_transformers() -> None:
    import transformers

    if _parse(transformers.__version__) < MIN_TRANSFORMERS:
        raise ImportError(
            f"vtprune needs transformers>={'.'.join(map(str, MIN_TRANSFORMERS))} (found {transformers.__version__}); "
            "its hooks follow the transformers 5 decoder loop. Upgrade with: pip install -U 'transformers>=5'"
        )
