"""Dense scene supervision of the visual tokens, used only while training the tiny SynthVQA models.

A tiny vision tower trained from scratch through the language model's answer loss alone learns colour
quickly but shape and position far too slowly for a CPU budget (answer accuracy stalls near chance). So
training adds a second, dense signal: linear probes on the visual tokens the language model receives
(the projector / patch-merger output) predict, for every token, the colour, shape, row and column of the
object in the grid cell under that token (or "empty"). The probes are thrown away after training; the
shipped checkpoints are plain Hugging Face models.

Every token of an occupied cell carries the label, not only the ones the object's pixels touch, so an
object is always the same number of tokens (9 for LLaVA's 3x3 patches per cell, 4 for Qwen2-VL's 2x2
merged tokens): counting then reads as "how much of the image matches".

Example:
    >>> from vtprune.eval.synthetic.synthvqa import generate_synthvqa
    >>> labels = scene_token_labels(generate_synthvqa(2, seed=0), side=12)
    >>> labels.shape
    torch.Size([2, 144, 4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .synthvqa_scenes import COLOURS, GRID, SHAPES

__all__ = ["VisualTokenProbe", "media_token_labels", "scene_token_labels"]

_COLOURS, _SHAPES = tuple(COLOURS), tuple(SHAPES)
# (name, classes): colour/shape use class 0 for "empty cell"; row/col are ignored (-100) on empty cells.
HEADS = (("colour", 1 + len(_COLOURS)), ("shape", 1 + len(_SHAPES)), ("row", GRID), ("col", GRID))


def scene_token_labels(items: list[dict], side: int) -> torch.Tensor:
    """``(B, side * side, 4)`` labels (colour, shape, row, col) of a row-major ``side x side`` token grid.

    ``side`` must be a multiple of the scene grid (12 for LLaVA, 8 for Qwen2-VL's merged tokens).
    """
    if side % GRID:
        raise ValueError(f"token grid side {side} is not a multiple of the scene grid {GRID}")
    per_cell = side // GRID
    cell_of = torch.arange(side) // per_cell
    labels = torch.empty(len(items), side, side, 4, dtype=torch.long)
    labels[..., :2] = 0
    labels[..., 2:] = -100
    for b, item in enumerate(items):
        for obj in item["objects"]:
            rows, cols = cell_of == obj["row"], cell_of == obj["col"]
            cell = rows[:, None] & cols[None, :]
            labels[b][cell] = torch.tensor(
                [1 + _COLOURS.index(obj["colour"]), 1 + _SHAPES.index(obj["shape"]), obj["row"], obj["col"]]
            )
    return labels.reshape(len(items), side * side, 4)


def media_token_labels(items: list[dict], side: int) -> torch.Tensor:
    """:func:`scene_token_labels` for a batch of SynthVQA images *or* SynthVQA-Video clips.

    A clip (an item with ``states``) has one token grid per scene state (per Qwen2-VL tubelet), in time
    order, so its labels are ``(STEPS * side * side, 4)``.

    Example:
        >>> from vtprune.eval.synthetic.synthvqa_video import generate_synthvqa_video
        >>> media_token_labels(generate_synthvqa_video(2), side=8).shape
        torch.Size([2, 256, 4])
    """
    if not any("states" in it for it in items):
        return scene_token_labels(items, side)
    return torch.stack(
        [torch.cat([scene_token_labels([{"objects": st}], side)[0] for st in it["states"]]) for it in items]
    )


class VisualTokenProbe(nn.Module):
    """Linear probes on the visual tokens a VLM's language model receives, captured by a forward hook.

    Example:
        >>> probe = VisualTokenProbe(model, "llava")  # doctest: +SKIP
        >>> loss = answer_loss + probe.loss(scene_token_labels(items, side=12))  # doctest: +SKIP
    """

    def __init__(self, model, arch: str):
        super().__init__()
        hidden = model.config.text_config.hidden_size
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in HEADS})
        source = model.model.multi_modal_projector if arch == "llava" else model.model.visual.merger
        self._features: torch.Tensor | None = None
        self._hook = source.register_forward_hook(self._capture)

    def _capture(self, module, args, output) -> None:
        self._features = output

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the heads for the last forward's visual tokens (``labels`` from
        :func:`scene_token_labels`, same image order)."""
        if self._features is None:
            raise RuntimeError("no visual tokens captured: run the model forward first")
        feats = self._features.reshape(labels.shape[0], labels.shape[1], -1)
        self._features = None
        losses = [
            F.cross_entropy(head(feats).flatten(0, 1).float(), labels[..., i].flatten(), ignore_index=-100)
            for i, head in enumerate(self.heads.values())
        ]
        return torch.stack(losses).mean()

    def remove(self) -> None:
        self._hook.remove()


# ---------------------------------------------------------------------------------------------------------
# attention supervision: the answer position looks at the evidence
# ---------------------------------------------------------------------------------------------------------


def _cell_tokens(item: dict, objects: list[int], image_pos: torch.Tensor, side: int, length: int):
    """``[length]`` bool: the sequence positions of the visual tokens in the cells of ``objects``."""
    per_cell = side // GRID
    mask = torch.zeros(length, dtype=torch.bool)
    for i in objects:
        obj = item["objects"][i]
        r0, c0 = obj["row"] * per_cell, obj["col"] * per_cell
        cell = [(r0 + dr) * side + c0 + dc for dr in range(per_cell) for dc in range(per_cell)]
        mask[image_pos[cell]] = True
    return mask


def _state_tokens(item: dict, pairs, image_pos: torch.Tensor, side: int, length: int):
    """``[length]`` bool: the visual tokens of a clip's ``(state, "colour shape")`` evidence pairs (each
    state is one ``side x side`` grid, laid out in time order)."""
    per_cell = side // GRID
    mask = torch.zeros(length, dtype=torch.bool)
    for state, name in pairs:
        for obj in item["states"][state]:
            if f"{obj['colour']} {obj['shape']}" != name:
                continue
            r0, c0 = obj["row"] * per_cell, obj["col"] * per_cell
            cell = [
                state * side * side + (r0 + dr) * side + c0 + dc
                for dr in range(per_cell)
                for dc in range(per_cell)
            ]
            mask[image_pos[cell]] = True
    return mask


def _video_heads(item: dict, block: dict, image_pos, side: int, length: int, heads: int):
    """Per-head targets of one clip question: motion splits the heads between the object's first and
    last position (as a spatial relation does between its two objects); a frame question answered "no"
    looks at the first token (nothing in the asked frame matches); otherwise the evidence tokens."""
    if block["qtype"] == "frame" and block["answer"] == "no":
        sink = torch.zeros(length, dtype=torch.bool)
        sink[0] = True
        return [sink] * heads
    pairs = [tuple(p) for p in block["focus"]]
    if block["qtype"] == "motion":
        first = _state_tokens(item, pairs[:1], image_pos, side, length)
        last = _state_tokens(item, pairs[1:], image_pos, side, length)
        return [first if h < heads // 2 else last for h in range(heads)]
    return [_state_tokens(item, pairs, image_pos, side, length)] * heads


def answer_focus(items: list[dict], batch: dict, side: int, image_token_id: int, heads: int):
    """Answer query rows and where each attention head there should look, for a packed training batch.

    Returns ``(rows, positions, focus)``: for every question block, the batch row, the sequence position
    that predicts the answer word, and a ``[N, heads, L]`` bool mask of the tokens each head should
    attend to: the visual tokens in the evidence objects' cells; for a spatial relation, half the heads
    on the first object and half on the second (heads that average both could not tell which is left);
    and when nothing in the image matches the question (an existence question answered "no", a count of
    0), the sequence's first token, the usual attention sink. A "no" then reads as "looked at the sink"
    instead of "looked at the object that shares one attribute with the asked one" (the evidence the
    generator records for such a question), exactly the partial match it must tell apart from a full one.
    For SynthVQA-Video clips ``image_token_id`` is the video token's id; see :func:`_video_heads`.
    """
    labels = batch["labels"]
    starts = (labels != -100) & (torch.roll(labels, 1, dims=1) == -100)  # first answer token of each block
    rows, positions, focus = [], [], []
    for b, item in enumerate(items):
        image_pos = torch.nonzero(batch["input_ids"][b] == image_token_id).flatten()
        length = labels.shape[1]
        blocks = [item] + item.get("extra", [])
        answer_starts = torch.nonzero(starts[b]).flatten().tolist()
        for block, start in zip(blocks, answer_starts):
            evidence = block["focus"]
            if "states" in item:
                per_head = _video_heads(item, block, image_pos, side, length, heads)
            elif (block["qtype"] == "exist" and block["answer"] == "no") or not evidence:
                sink = torch.zeros(labels.shape[1], dtype=torch.bool)
                sink[0] = True
                per_head = [sink] * heads
            elif block["qtype"] == "spatial":
                first = _cell_tokens(item, evidence[:1], image_pos, side, length)
                second = _cell_tokens(item, evidence[1:], image_pos, side, length)
                per_head = [first if h < heads // 2 else second for h in range(heads)]
            else:
                per_head = [_cell_tokens(item, evidence, image_pos, side, length)] * heads
            rows.append(b)
            positions.append(start - 1)
            focus.append(torch.stack(per_head))
    return torch.tensor(rows), torch.tensor(positions), torch.stack(focus)


class AnswerAttentionProbe:
    """Records one decoder layer's attention probabilities at chosen query rows (training only).

    It installs a wrapper around SDPA for the language model (the vision tower keeps its backend): the
    wrapper runs SDPA as usual and, at ``layer``, also computes the softmax rows of the queries set by
    :meth:`loss`'s caller, so supervising where the answer looks costs no eager attention everywhere.
    """

    NAME = "vtprune_train_answer_probe"

    def __init__(self, model, layer: int):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.layer, self.query = layer, None
        self.probs: torch.Tensor | None = None
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

        def attention(module, query, key, value, attention_mask, **kwargs):
            if module.layer_idx == self.layer and self.query is not None:
                self.probs = self._rows(module, query, key, attention_mask, kwargs.get("scaling"))
            return sdpa(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(self.NAME, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(self.NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        self.config = model.config.text_config
        self._previous = self.config._attn_implementation
        self.config._attn_implementation = self.NAME

    def _rows(self, module, query, key, mask, scaling):
        rows, positions = self.query
        q = query[rows, :, positions]  # [N, H, D]
        k = key[rows].repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # [N, H, L, D]
        scores = torch.einsum("nhd,nhld->nhl", q, k) * (scaling or q.shape[-1] ** -0.5)
        m = mask[rows, 0, positions]  # [N, L]
        scores = (
            scores.masked_fill(~m[:, None], float("-inf")) if m.dtype == torch.bool else scores + m[:, None]
        )
        return scores.float().softmax(-1)

    def loss(self, focus: torch.Tensor) -> torch.Tensor:
        """``-log`` of each head's attention mass on its target tokens (``[N, heads, L]``), mean over all."""
        if self.probs is None:
            raise RuntimeError("no attention rows recorded: set .query and run the forward first")
        mass = (self.probs * focus).sum(-1)
        self.probs = None
        return -torch.log(mass + 1e-6).mean()

    def remove(self) -> None:
        self.config._attn_implementation = self._previous
