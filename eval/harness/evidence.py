"""Where pruning looks: the share of kept visual tokens that lie on objects in SynthVQA scenes.

SynthVQA scenes are a few objects on a plain background, and every question is about objects, so a
method that scores visual tokens well keeps object tokens more often than their share of the image.
This reads each plan's final selection (``vtprune.stats(model).selections``, the last stage's kept
tokens) on held-out scenes and compares it with that share: it tells a method that finds evidence
from one whose scores, on a given model, are no better than chance.

Example:
    >>> from vtprune.eval.synthetic.tiny_models import load_tiny  # doctest: +SKIP
    >>> model, processor = load_tiny("llava")  # doctest: +SKIP
    >>> object_token_share(model, processor, "fastv:keep=0.5", generate_synthvqa(40))  # doctest: +SKIP
    {'kept_on_objects': 0.449, 'objects_in_image': 0.317, 'objects_covered': 0.97}
"""

from __future__ import annotations

import torch

import vtprune
from vtprune.eval.synthetic.synthvqa_scenes import GRID

from .generation import encode
from .plans import apply_plan
from .tasks import chat_prompt


def object_cells(item: dict, side: int) -> torch.Tensor:
    """``(objects, side * side)`` bool: the tokens of a row-major ``side x side`` grid on each object's cell.

    Example:
        >>> object_cells({"objects": [{"row": 0, "col": 1}]}, side=8).nonzero()[:, 1].tolist()
        [2, 3, 10, 11]
    """
    if side % GRID:
        raise ValueError(f"token grid side {side} is not a multiple of the scene grid {GRID}")
    cell_of = torch.arange(side) // (side // GRID)
    cells = [(cell_of == obj["row"])[:, None] & (cell_of == obj["col"])[None, :] for obj in item["objects"]]
    return torch.stack(cells).reshape(len(cells), side * side)


def object_token_share(model, processor, plan: str, items: list[dict], batch_size: int = 8) -> dict | None:
    """Mean share of a plan's finally kept visual tokens on object cells, beside the image's own share,
    and the mean share of a scene's objects with at least one kept token (``objects_covered``).

    ``None`` when the plan records no selection or its last one keeps nothing (the baseline keeps
    every token; layer skipping's visual-token removal keeps none from ``L_cut`` on).
    """
    device = next(model.parameters()).device
    image_token = model.config.image_token_id
    kept, present, covered = [], [], []
    apply_plan(model, plan)
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            prompts = [chat_prompt(processor, it["question"]) for it in chunk]
            enc = encode(processor, prompts, [it["image"] for it in chunk], device)
            with torch.inference_mode():
                model(**enc)
            selections = vtprune.stats(model).selections if plan != "baseline" else {}
            if not selections:
                return None
            final = list(selections.values())[-1]
            for row, positions in enumerate(final):
                if len(positions) == 0:
                    continue
                visual = (enc["input_ids"][row] == image_token).nonzero()[:, 0].cpu()
                side = int(len(visual) ** 0.5)
                cells = object_cells(chunk[row], side)
                on_object = cells.any(0)
                slot = torch.searchsorted(visual, positions)
                kept.append(on_object[slot].float().mean().item())
                present.append(on_object.float().mean().item())
                covered.append(cells[:, slot].any(1).float().mean().item())
    finally:
        vtprune.remove(model)
    if not kept:
        return None
    n = len(kept)
    return {
        "kept_on_objects": sum(kept) / n,
        "objects_in_image": sum(present) / n,
        "objects_covered": sum(covered) / n,
    }
