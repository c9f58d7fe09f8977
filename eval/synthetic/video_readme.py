"""README of the tiny Qwen2-VL SynthVQA-Video checkpoint, written from its ``training_info.json``.

Example:
    >>> from vtprune.eval.synthetic.video_readme import video_readme_text  # doctest: +SKIP
"""

from __future__ import annotations

import os

import torch

from .synthvqa import QTYPES
from .synthvqa_video import FRAMES, STEPS, VIDEO_QTYPES, build_video_prompt

__all__ = ["video_readme_text", "write_video_readme"]


def _rows(ev: dict, qtypes) -> str:
    return "\n".join(
        f"| {q} | {ev['per_qtype'].get(q, 0.0):.3f} | {ev['n_per_qtype'].get(q, 0)} |" for q in qtypes
    )


def video_readme_text(info: dict, size_mb: float) -> str:
    """The README for a video checkpoint described by ``info`` (the saved ``training_info.json``)."""
    ev, im = info["eval"], info.get("image_eval") or {}
    example = build_video_prompt("which way does the red circle move ?").replace("\n", "\\n")
    image_part, init = "", im.get("init")
    init_note = ""
    if init:
        per = ", ".join(f"{q} {init['per_qtype'].get(q, 0.0):.3f}" for q in QTYPES)
        init_note = (
            f"; the image model it started from scores {init['accuracy']:.3f} on the same images ({per})"
        )
    if im.get("n"):
        image_part = f"""
Still images (SynthVQA, `generate_synthvqa({im["n"]}, seed={im["seed"]})`){init_note}:

| question type | accuracy | n |
|---|---|---|
{_rows(im, QTYPES)}
| **overall** | **{im["accuracy"]:.3f}** | {im["n"]} |
"""
    frozen = (
        "The vision tower (incl. patch merger) is frozen: each tubelet is a still, which the image model's "
        "tower already encodes; only the decoder learns the temporal questions."
        if info.get("freeze_vision")
        else "All weights are trained."
    )
    return f"""# Tiny Qwen2-VL model for SynthVQA-Video (vtprune)

The tiny Qwen2-VL architecture model (`tiny-qwen2vl-synthvqa`: ViT patch 12, 4 layers, width 96, 2x2
merger; Qwen2 decoder 12 layers, hidden 128, 4 query / 2 key-value heads, M-RoPE) fine-tuned on
SynthVQA-Video (`vtprune.eval.synthetic.synthvqa_video`): {FRAMES}-frame 192x192 clips of moving shapes, the
scene changing every 2 frames, so the processor's 2-frame tubelets give {STEPS} x 64 = {STEPS * 64} visual
tokens per clip. {info["params"]:,} parameters, float32 safetensors ({size_mb:.1f} MB). Its vocabulary
is the image model's plus the video words (appended, so every image word keeps its id). It still answers
SynthVQA image questions. It exists to make visual-token pruning of video measurable offline, not to be
a general model.

Prompt (`build_video_prompt`, same as the processor's chat template with a `video` content item):
`{example}`; the answer is one word followed by the end-of-turn token.

## Training

- command: `{info["command"]}`
- started from `{info.get("init")}`; seed {info["seed"]}, {info["steps"]} steps of {info["batch_size"]} clips x
  up to {info["questions_per_image"]} questions (packed behind one clip encoding), every
  {info.get("image_every")}-th step a SynthVQA image batch instead; AdamW lr {info["lr"]} (warm-up + cosine).
  {frozen}
- training-only losses as for the image models (`train_aux`, dropped afterwards): per-visual-token probes
  (per tubelet) and the answer position's attention at decoder layer {info["attn_layer"]} pulled onto the
  evidence (motion: half the heads on the object in the first state, half in the last; a frame question
  answered "no": the first token; otherwise the object's tokens in the evidence states)
- time: {info["train_seconds"] / 60:.1f} min wall clock, {info["train_cpu_seconds"] / 60:.1f} CPU-minutes on
  {info["threads"]} thread(s) (torch {torch.__version__}), on 2 shared CPU cores

## Held-out accuracy

Greedy generation on {ev["n"]} clips of split `{ev["split"]}`, seed {ev["seed"]}
(`generate_synthvqa_video({ev["n"]}, seed={ev["seed"]})`). Chance: 0.25 for motion (4 directions),
0.5 for frame (yes/no), 0.25 for count (1-4).

| question type | accuracy | n |
|---|---|---|
{_rows(ev, VIDEO_QTYPES)}
| **overall** | **{ev["accuracy"]:.3f}** | {ev["n"]} |
{image_part}"""


def write_video_readme(out: str, info: dict) -> None:
    """Write ``README.md`` into the checkpoint folder ``out`` (which holds ``model.safetensors``)."""
    size_mb = os.path.getsize(os.path.join(out, "model.safetensors")) / 2**20
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(video_readme_text(info, size_mb))
