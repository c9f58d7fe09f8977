import os

# The Triton interpreter must be chosen before any kernel is defined (see HF_INTERNALS.md).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _no_leftover_plans():
    yield
    from vtprune.runtime.state import ACTIVE, LABELS

    ACTIVE.set(None)
    LABELS.set(None)


@pytest.fixture
def warm_onevision():
    """A tiny LLaVA-OneVision that has run once: HF adds its output-capturing hooks at the first
    call, and those are not ours to count in the hook tables."""
    import tiny

    model = tiny.llava_onevision()
    with torch.no_grad():
        model(**tiny.inputs("llava_onevision", model, [1]))
    return model
