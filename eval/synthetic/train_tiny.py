"""Train a tiny LLaVA-1.5 / Qwen2-VL architecture model on freshly generated SynthVQA data (CPU, minutes).

    python -m vtprune.eval.synthetic.train_tiny --arch llava --out vtprune/assets/tiny-llava-synthvqa --threads 1

* Reproducible: weights are seeded and training batch ``b`` is SynthVQA split ``train``, items
  ``[b*B, (b+1)*B)`` of ``--seed``, so an interrupted run resumes exactly from ``<out>/checkpoint/``.
* Teacher forcing with loss only on the answer word and the end-of-turn token.
* Several questions share one image: the sequence is ``[prefix+image][q1 a1][q2 a2]...`` with a block
  attention mask (each question block sees the image prefix and itself only) and position ids that restart
  after the image, so every block is *exactly* the single-question prompt of :func:`build_prompt`. The
  image is encoded once per K questions, which makes CPU training several times cheaper.
* Two training-only signals beside the answer loss (:mod:`vtprune.eval.synthetic.train_aux`), without which a tiny
  model trained from scratch stays near chance on CPU budgets: linear probes on the visual tokens predict
  each token's cell contents (colour, shape, row, column), and the answer position's attention at one
  decoder layer is pulled onto the question's evidence (or onto the first token when nothing matches).
  Both are dropped after training; the checkpoint is a plain Hugging Face model.
* AdamW + linear warm-up + cosine decay; final greedy-generation evaluation on held-out split ``test``.
* ``--media video`` (Qwen2-VL only) trains on SynthVQA-Video clips (:mod:`vtprune.eval.synthetic.synthvqa_video`)
  through the processor's video path (``pixel_values_videos`` / ``video_grid_thw``), the probes and the
  attention target extended per tubelet; ``--init`` starts from a saved model (the shipped image model,
  whose tower and decoder already know colours, shapes and positions; its vocabulary grows by the video
  words, appended), and ``--image-every K`` makes every K-th step an image batch so image skills stay.

Example:
    >>> from vtprune.eval.synthetic.train_tiny import train  # doctest: +SKIP
    >>> result = train("qwen2_vl", "/tmp/tiny-qwen", steps=20)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .synthvqa import (
    AUX_QTYPES,
    QTYPES,
    build_prompt,
    build_target,
    generate_synthvqa,
    prompt_parts,
    score_synthvqa,
)
from .synthvqa_scenes import MAX_OBJECTS, MIN_OBJECTS
from .synthvqa_video import (
    VIDEO_QTYPES,
    VIDEO_WORDS,
    build_video_prompt,
    generate_synthvqa_video,
    video_prompt_parts,
)
from .tiny_models import DEFAULT_SIZES, build_processor, build_tiny, num_image_tokens, save_tiny
from .train_aux import AnswerAttentionProbe, VisualTokenProbe, answer_focus, media_token_labels

__all__ = ["evaluate", "make_batch", "predict", "train"]

CKPT_NAME = os.path.join("checkpoint", "train_state.pt")
ALL_QTYPES = QTYPES + AUX_QTYPES + tuple(q for q in VIDEO_QTYPES if q not in QTYPES)
MEDIA = ("image", "video")


# ---------------------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------------------


def _questions(item: dict) -> list[tuple[str, str, str]]:
    extra = item.get("extra", [])
    return [(item["question"], item["answer"], item["qtype"])] + [
        (e["question"], e["answer"], e["qtype"]) for e in extra
    ]


def make_batch(items: list[dict], processor, arch: str, model=None) -> dict:
    """Pack each item's questions behind one encoding of its image (see module docstring).

    Returns model inputs (``input_ids, attention_mask`` as a 4D boolean block mask, ``position_ids``,
    pixel tensors) plus ``labels`` (-100 outside answers) and ``label_qtype`` (question-type index per
    position, -1 elsewhere). ``model`` is needed for Qwen2-VL to compute the M-RoPE ids of the image.
    SynthVQA-Video items (with ``frames``; Qwen2-VL only) go through the processor's video path and give
    ``pixel_values_videos`` and ``video_grid_thw`` instead.

    Example:
        >>> batch = make_batch(generate_synthvqa(2, questions_per_image=3), processor, "llava")  # doctest: +SKIP
    """
    tok = processor.tokenizer
    video = "frames" in items[0]
    if video and arch != "qwen2_vl":
        raise ValueError(f"video batches need arch 'qwen2_vl', got {arch!r}")
    prefix, suffix = video_prompt_parts() if video else prompt_parts(arch)
    media = {"videos": [it["frames"] for it in items]} if video else {"images": [it["image"] for it in items]}
    enc = processor(**media, text=[prefix] * len(items), return_tensors="pt")
    pre_ids = enc["input_ids"]  # identical length for all: fixed image grid, no padding
    n_pre = pre_ids.shape[1]
    if arch == "qwen2_vl":
        pre_pos, _ = model.model.get_rope_index(
            pre_ids,
            enc["mm_token_type_ids"],
            image_grid_thw=enc.get("image_grid_thw"),
            video_grid_thw=enc.get("video_grid_thw"),
        )
    else:
        pre_pos = torch.arange(n_pre).expand(1, len(items), -1)
    text_start = int(pre_pos[..., -1].max()) + 1  # same for every row (same grid)

    rows = []
    for it in items:
        ids, labels, seg, pos, qt = [], [], [], [], []
        for j, (question, answer, qtype) in enumerate(_questions(it), start=1):
            q_ids = tok(question + suffix, add_special_tokens=False)["input_ids"]
            a_ids = tok(build_target(answer, arch), add_special_tokens=False)["input_ids"]
            ids += q_ids + a_ids
            labels += [-100] * len(q_ids) + a_ids
            qt += [-1] * len(q_ids) + [ALL_QTYPES.index(qtype)] * len(a_ids)
            seg += [j] * (len(q_ids) + len(a_ids))
            pos += list(range(text_start, text_start + len(q_ids) + len(a_ids)))
        rows.append((ids, labels, seg, pos, qt))
    n_text = max(len(r[0]) for r in rows)
    B, L = len(items), n_pre + n_text

    input_ids = torch.full((B, L), tok.pad_token_id)
    labels = torch.full((B, L), -100)
    label_qtype = torch.full((B, L), -1)
    seg = torch.full((B, L), -1)  # -1 = padding, 0 = image prefix, j = question block j
    text_pos = torch.zeros((B, L), dtype=torch.long)
    input_ids[:, :n_pre] = pre_ids
    seg[:, :n_pre] = 0
    for b, (ids, lab, sg, ps, qt) in enumerate(rows):
        n = len(ids)
        input_ids[b, n_pre : n_pre + n] = torch.tensor(ids)
        labels[b, n_pre : n_pre + n] = torch.tensor(lab)
        label_qtype[b, n_pre : n_pre + n] = torch.tensor(qt)
        seg[b, n_pre : n_pre + n] = torch.tensor(sg)
        text_pos[b, n_pre : n_pre + n] = torch.tensor(ps)

    # Block mask: causal, and a query sees the image prefix plus its own block only. Padding rows attend
    # to themselves so that no softmax row is empty (an empty row gives NaN, which leaks into gradients).
    sq, sk = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = causal & ((sk == 0) | (sk == sq)) & (sk != -1)
    allowed |= torch.eye(L, dtype=torch.bool)
    batch = {
        "input_ids": input_ids,
        "attention_mask": allowed[:, None],
        "labels": labels,
        "label_qtype": label_qtype,
    }
    pixels = ("pixel_values_videos", "video_grid_thw") if video else ("pixel_values", "image_grid_thw")
    batch[pixels[0]] = enc[pixels[0]]
    if arch == "qwen2_vl":
        position_ids = text_pos[None].repeat(3, 1, 1)
        position_ids[:, :, :n_pre] = pre_pos
        batch["position_ids"] = position_ids
        batch[pixels[1]] = enc[pixels[1]]
    else:
        text_pos[:, :n_pre] = torch.arange(n_pre)
        batch["position_ids"] = text_pos
    return batch


def _forward_loss(model, batch: dict):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label_qtype")}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels, qtype = batch["labels"][:, 1:], batch["label_qtype"][:, 1:]
    keep = labels != -100
    loss = F.cross_entropy(logits[keep].float(), labels[keep])
    with torch.no_grad():
        # accuracy on answer words only (the first target token of each block)
        first = keep & (qtype >= 0) & (batch["labels"][:, :-1] == -100)
        hit = logits.argmax(-1)[first] == labels[first]
    return loss, hit, qtype[first]


# ---------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model, processor, items: list[dict], arch: str, batch_size: int = 32) -> list[str]:
    """Greedy answers (``model.generate``) for items (SynthVQA images or SynthVQA-Video clips), using
    the training prompt format.

    Example:
        >>> answers = predict(model, processor, generate_synthvqa(8), "llava")  # doctest: +SKIP
    """
    model.eval()
    processor.tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        if "frames" in chunk[0]:
            media = {"videos": [it["frames"] for it in chunk]}
            text = [build_video_prompt(it["question"]) for it in chunk]
        else:
            media = {"images": [it["image"] for it in chunk]}
            text = [build_prompt(it["question"], arch) for it in chunk]
        enc = processor(**media, text=text, return_tensors="pt", padding=True)
        gen = model.generate(**enc, max_new_tokens=3, do_sample=False)
        out += processor.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]


def evaluate(
    model, processor, arch: str, n: int = 400, seed: int = 0, batch_size: int = 32, media: str = "image"
) -> dict:
    """Score greedy answers on ``n`` held-out items (split ``test``) of SynthVQA or, with
    ``media="video"``, SynthVQA-Video; see :func:`score_synthvqa`.

    Example:
        >>> evaluate(model, processor, "llava", n=40)["accuracy"]  # doctest: +SKIP
        0.9
    """
    gen = generate_synthvqa_video if media == "video" else generate_synthvqa
    items = gen(n, seed=seed, split="test")
    was_training = model.training
    result = score_synthvqa(items, predict(model, processor, items, arch, batch_size))
    model.train(was_training)
    return result


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------


def initial_model(arch: str, seed: int, media: str = "image", init: str | None = None):
    """``(model, processor)`` to train: a fresh tiny model, or the saved model ``init`` with its vocabulary
    grown by the video words (appended, new embedding rows seeded) when ``media == "video"``.

    Example:
        >>> model, processor = initial_model("qwen2_vl", 0, "video")
        >>> processor.tokenizer.convert_tokens_to_ids("frame") < model.config.text_config.vocab_size
        True
    """
    words = VIDEO_WORDS if media == "video" else ()
    if init is None:
        return build_tiny(arch, seed=seed, extra_words=words)
    from .tiny_models import load_tiny

    model, old = load_tiny(init)
    if model.config.model_type != arch:
        raise ValueError(f"--init {init!r} is a {model.config.model_type} model, not {arch!r}")
    processor = build_processor(arch, extra_words=words)
    new_vocab = processor.tokenizer.get_vocab()
    moved = [w for w, i in old.tokenizer.get_vocab().items() if new_vocab.get(w) != i]
    if moved:
        raise ValueError(f"--init {init!r}: its tokenizer gives other ids to {moved[:5]}; cannot extend it")
    size = -(-len(processor.tokenizer) // 16) * 16
    if size > model.config.text_config.vocab_size:
        torch.manual_seed(seed)  # the new rows are drawn by the model's own initialiser
        model.resize_token_embeddings(size, mean_resizing=False)
    return model.train(), processor


def _step_items(step, media, image_every, seed, batch_size, questions, focus_steps, curriculum_steps):
    """Training items of step ``step``: SynthVQA-Video clips ``[step*B, (step+1)*B)`` of split ``train``,
    or SynthVQA images (the curriculum's) on image steps; a pure function of its arguments."""
    image_step = media == "image" or (image_every and step % image_every == image_every - 1)
    if not image_step:
        return generate_synthvqa_video(
            batch_size, seed=seed, split="train", start=step * batch_size, questions_per_clip=questions
        )
    n_objects, extra_qtypes = curriculum(step, focus_steps, curriculum_steps)
    return generate_synthvqa(
        batch_size,
        seed=seed,
        split="train",
        start=step * batch_size,
        questions_per_image=questions,
        n_objects=n_objects,
        extra_qtypes=extra_qtypes,
    )


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


FOCUS_QTYPES = ("shape", "attribute", "exist", "where")


def curriculum(step: int, focus_steps: int, curriculum_steps: int) -> tuple[tuple[int, int], tuple[str, ...]]:
    """(object-count range, extra question types) for training step ``step``.

    1. ``focus_steps``: scenes of 1-2 objects and extra questions about shapes and positions only. Tiny
       models from scratch learn colour almost at once but shapes only with a focused signal; in the full
       mixture the shape pathway never forms within a CPU budget.
    2. ``curriculum_steps``: all question types, the largest object count growing from 2 to 7.
    3. then the benchmark distribution (3-7 objects) with all question types.

    Example:
        >>> [curriculum(s, 400, 1000)[0] for s in (0, 400, 900, 1400)]
        [(1, 2), (1, 2), (1, 4), (3, 7)]
    """
    everything = QTYPES + AUX_QTYPES
    if step < focus_steps:
        return (1, 2), FOCUS_QTYPES
    step -= focus_steps
    if step >= curriculum_steps:
        return (MIN_OBJECTS, MAX_OBJECTS), everything
    return (1, 2 + int(step / curriculum_steps * (MAX_OBJECTS - 2))), everything


def train(
    arch: str,
    out: str,
    steps: int = 2000,
    seed: int = 0,
    batch_size: int = 16,
    questions_per_image: int = 6,
    focus_steps: int = 150,
    curriculum_steps: int = 500,
    lr: float = 1.5e-3,
    aux_weight: float = 1.0,
    attn_weight: float = 1.0,
    attn_layer: int = 3,
    weight_decay: float = 0.01,
    warmup: int = 60,
    ckpt_every: int = 50,
    eval_n: int = 400,
    eval_seed: int = 0,
    threads: int = 2,
    command: str | None = None,
    media: str = "image",
    init: str | None = None,
    image_every: int = 0,
    image_eval_n: int = 200,
    freeze_vision: bool = False,
) -> dict:
    """Train (or resume) a tiny model, save it with its processor into ``out``, return the held-out score.

    ``media="video"`` trains on SynthVQA-Video clips (``questions_per_image`` questions per clip), every
    ``image_every``-th step on a SynthVQA image batch instead (0: never); ``init`` is a saved model to
    start from instead of a fresh one (see the module docstring). ``freeze_vision`` trains the decoder
    only (the tower of an image model started from already encodes each still tubelet).

    Example:
        >>> train("llava", "/tmp/tiny-llava", steps=10, eval_n=8)  # doctest: +SKIP
    """
    if media not in MEDIA:
        raise ValueError(f"media must be one of {MEDIA}, got {media!r}")
    if media == "video" and arch != "qwen2_vl":
        raise ValueError(f"media 'video' needs arch 'qwen2_vl' (a video path), got arch {arch!r}")
    if image_every < 0:
        raise ValueError(f"image_every must be >= 0 (0 = no image batches), got {image_every}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model, processor = initial_model(arch, seed, media, init)
    probe = VisualTokenProbe(model, arch)  # dense per-token scene labels (see train_aux), dropped at the end
    side = math.isqrt(num_image_tokens(processor, arch))
    # the answer position's attention at ``attn_layer`` is pulled onto the evidence (see train_aux)
    looker = AnswerAttentionProbe(model, attn_layer)
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    ckpt = os.path.join(out, CKPT_NAME)
    start, elapsed, cpu = 0, 0.0, 0.0
    if os.path.exists(ckpt):
        state = load_state(ckpt)
        if (state["arch"], state["seed"], state["steps"], state.get("media", "image")) != (
            arch,
            seed,
            steps,
            media,
        ):
            raise SystemExit(
                f"{ckpt} belongs to another run ({state['arch']}, seed {state['seed']}); remove it"
            )
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        opt.load_state_dict(state["optimizer"])
        start, elapsed, cpu = state["step"], state["elapsed"], state.get("cpu", 0.0)
        print(f"resuming {arch} from step {start}/{steps}")

    model.train()
    hits = {q: [] for q in ALL_QTYPES}
    t0, c0 = time.time() - elapsed, time.process_time() - cpu
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"train {arch}", dynamic_ncols=True)
    for step in bar:
        # batch ``step`` is fully determined by the step index (exact resume); see _step_items
        items = _step_items(
            step, media, image_every, seed, batch_size, questions_per_image, focus_steps, curriculum_steps
        )
        batch = make_batch(items, processor, arch, model)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        token = model.config.video_token_id if "frames" in items[0] else model.config.image_token_id
        rows, positions, focus = answer_focus(
            items, batch, side, token, model.config.text_config.num_attention_heads
        )
        looker.query = (rows, positions)
        answer_loss, hit, qt = _forward_loss(model, batch)
        aux_loss = probe.loss(media_token_labels(items, side))
        attn_loss = looker.loss(focus)
        loss = answer_loss + aux_weight * aux_loss + attn_weight * attn_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for i, q in enumerate(ALL_QTYPES):  # running answer accuracy per type over the last ~20 steps
            hits[q] = (hits[q] + hit[qt == i].float().tolist())[-20 * batch_size :]
        bar.set_postfix(
            loss=f"{answer_loss.item():.3f}",
            aux=f"{aux_loss.item():.2f}",
            look=f"{attn_loss.item():.2f}",
            **{q[:5]: f"{sum(h) / max(1, len(h)):.2f}" for q, h in hits.items()},
        )
        if (step + 1) % ckpt_every == 0 and step + 1 < steps:
            times = (time.time() - t0, time.process_time() - c0)
            _save_state(ckpt, model, probe, opt, arch, seed, steps, step + 1, *times, media=media)
    train_seconds, cpu_seconds = time.time() - t0, time.process_time() - c0
    bar.close()
    probe.remove()
    looker.remove()

    result = evaluate(model, processor, arch, n=eval_n, seed=eval_seed, media=media)
    print(f"held-out ({eval_n} items, split test seed {eval_seed}): overall {result['accuracy']:.3f}")
    for q in VIDEO_QTYPES if media == "video" else QTYPES:
        print(f"  {q:10s} {result['per_qtype'].get(q, 0.0):.3f}  (n={result['n_per_qtype'].get(q, 0)})")
    image_result = None
    if media == "video" and image_eval_n:  # what is left of the image skills
        image_result = evaluate(model, processor, arch, n=image_eval_n, seed=eval_seed)
        print(f"held-out images ({image_eval_n} items): overall {image_result['accuracy']:.3f}")
        if init is not None:  # the same images with the model it started from: what the video steps cost
            from .tiny_models import load_tiny

            image_result["init"] = evaluate(*load_tiny(init), arch, n=image_eval_n, seed=eval_seed)
    save_tiny(model, processor, out)
    info = {
        "arch": arch,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "questions_per_image": questions_per_image,
        "focus_steps": focus_steps,
        "curriculum_steps": curriculum_steps,
        "lr": lr,
        "aux_weight": aux_weight,
        "attn_weight": attn_weight,
        "attn_layer": attn_layer,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),  # wall time is inflated when the cores are shared
        "threads": threads,
        "eval": {"n": eval_n, "seed": eval_seed, "split": "test", **result},
        "sizes": DEFAULT_SIZES[arch],
        "params": sum(p.numel() for p in model.parameters()),
        "visual_tokens": num_image_tokens(processor, arch),
        "command": command,
    }
    if media == "video":
        info.update(media=media, init=init, image_every=image_every, freeze_vision=freeze_vision)
        info["image_eval"] = {"n": image_eval_n, "seed": eval_seed, "split": "test", **(image_result or {})}
    with open(os.path.join(out, "training_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    if media == "video":
        from .video_readme import write_video_readme

        write_video_readme(out, info)
    else:
        write_readme(out, info)
    shutil.rmtree(os.path.join(out, "checkpoint"), ignore_errors=True)
    return info


def load_state(path: str) -> dict:
    """A training checkpoint, unpickled with ``weights_only=True``.

    Checkpoints hold only tensors, numbers, strings and containers of them (state dicts, the
    optimizer's state, the run's arch/seed/step), so nothing else is ever unpickled: a tampered or
    foreign checkpoint cannot run code on resume, it is refused.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(
            f"{path} holds objects other than tensors and plain values, so it is not loaded; remove it "
            f"to start over ({str(e).splitlines()[0]})"
        ) from e


def _save_state(path, model, probe, opt, arch, seed, steps, step, elapsed, cpu, media="image") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {
        "model": model.state_dict(),
        "probe": probe.state_dict(),
        "optimizer": opt.state_dict(),
        "arch": arch,
        "seed": seed,
        "steps": steps,
        "step": step,
        "elapsed": elapsed,
        "cpu": cpu,
        "media": media,
    }
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: an interrupt never leaves a half-written checkpoint


_ARCH_TEXT = {
    "llava": (
        "LLaVA-1.5 architecture (`LlavaForConditionalGeneration`): CLIP vision tower (patch {patch_size}, "
        "{vision_layers} layers, hidden {vision_hidden}), `vision_feature_layer=-2`, `default` strategy "
        "(CLS dropped), 2-layer GELU MLP projector, Llama decoder ({text_layers} layers, hidden "
        "{text_hidden}, {text_heads} heads)."
    ),
    "qwen2_vl": (
        "Qwen2-VL architecture (`Qwen2VLForConditionalGeneration`): Qwen2-VL ViT (patch {patch_size}, "
        "{vision_layers} layers, width {vision_hidden}, 2D RoPE) with 2x2 patch merger, Qwen2 decoder "
        "({text_layers} layers, hidden {text_hidden}, {text_heads} query / {text_kv_heads} key-value heads, "
        "M-RoPE)."
    ),
}


def write_readme(out: str, info: dict) -> None:
    """Write ``README.md`` for a trained checkpoint folder from the ``training_info.json`` contents."""
    ev = info["eval"]
    rows = "\n".join(
        f"| {q} | {ev['per_qtype'].get(q, 0.0):.3f} | {ev['n_per_qtype'].get(q, 0)} |" for q in QTYPES
    )
    example = build_prompt("is there a red circle ?", info["arch"]).replace("\n", "\\n")
    size_mb = os.path.getsize(os.path.join(out, "model.safetensors")) / 2**20
    text = f"""# Tiny {info["arch"]} model for SynthVQA (vtprune)

{_ARCH_TEXT[info["arch"]].format(**info["sizes"])}
{info["params"]:,} parameters, float32 safetensors ({size_mb:.1f} MB), {info["visual_tokens"]} visual tokens
per 192x192 image. Word-level tokenizer over the task vocabulary. Trained from scratch on procedurally
generated SynthVQA scenes (`vtprune.eval.synthetic.synthvqa`); it exists to make visual-token pruning measurable
offline, not to be a general model.

Load offline:

```python
from transformers import AutoProcessor, {"LlavaForConditionalGeneration" if info["arch"] == "llava" else "Qwen2VLForConditionalGeneration"} as M
model, processor = M.from_pretrained(path), AutoProcessor.from_pretrained(path)
```

Prompt (`vtprune.eval.synthetic.synthvqa.build_prompt`, same as the processor's chat template): `{example}`;
the answer is one word followed by the end-of-turn token.

## Training

- command: `{info["command"]}`
- seed {info["seed"]}, {info["steps"]} steps, {info["batch_size"]} images x {info["questions_per_image"]} questions per
  step, AdamW lr {info["lr"]} (warm-up + cosine), curriculum: {info["focus_steps"]} steps of 1-2 object scenes with shape/position questions, then
  {info["curriculum_steps"]} steps growing to the full 3-7 objects (see `train_tiny.curriculum`)
- training-only losses (`vtprune.eval.synthetic.train_aux`, dropped afterwards): per-visual-token probes for the
  colour/shape/row/column of the cell under the token (weight {info["aux_weight"]}), and the answer
  position's attention at decoder layer {info["attn_layer"]} pulled onto the evidence objects (spatial
  relations: half the heads per object; nothing matching: the first token) (weight {info["attn_weight"]})
- time: {info["train_seconds"] / 60:.1f} min wall clock, {info["train_cpu_seconds"] / 60:.1f} CPU-minutes on
  {info["threads"]} threads (torch {torch.__version__})

## Held-out accuracy

Greedy generation on {ev["n"]} items of split `{ev["split"]}`, seed {ev["seed"]} (`generate_synthvqa({ev["n"]}, seed={ev["seed"]})`).
Chance: 0.5 for yes/no, 0.2 for colour and count.

| question type | accuracy | n |
|---|---|---|
{rows}
| **overall** | **{ev["accuracy"]:.3f}** | {ev["n"]} |
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["llava", "qwen2_vl"], required=True)
    p.add_argument(
        "--out", required=True, help="output folder (model + processor; checkpoint/ while training)"
    )
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="images per step")
    p.add_argument("--questions-per-image", type=int, default=6)
    p.add_argument("--focus-steps", type=int, default=150, help="steps of small shape/position-only scenes")
    p.add_argument("--curriculum-steps", type=int, default=500, help="steps from 2 to 7 objects")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the dense visual-token loss")
    p.add_argument("--attn-weight", type=float, default=1.0, help="weight of the answer-attention loss")
    p.add_argument(
        "--attn-layer", type=int, default=3, help="decoder layer whose answer attention is supervised"
    )
    p.add_argument("--eval-n", type=int, default=400)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--media", choices=MEDIA, default="image", help="video: SynthVQA-Video clips (qwen2_vl)")
    p.add_argument("--init", default=None, help="saved model folder to start from (e.g. the image asset)")
    p.add_argument("--image-every", type=int, default=0, help="with --media video: every K-th step images")
    p.add_argument("--freeze-vision", action="store_true", help="train the decoder only")
    args = p.parse_args(argv)
    import sys

    train(
        args.arch,
        args.out,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        questions_per_image=args.questions_per_image,
        focus_steps=args.focus_steps,
        curriculum_steps=args.curriculum_steps,
        lr=args.lr,
        aux_weight=args.aux_weight,
        attn_weight=args.attn_weight,
        attn_layer=args.attn_layer,
        eval_n=args.eval_n,
        threads=args.threads,
        media=args.media,
        init=args.init,
        image_every=args.image_every,
        freeze_vision=args.freeze_vision,
        command="python -m vtprune.eval.synthetic.train_tiny "
        + " ".join(sys.argv[1:] if argv is None else argv),
    )


if __name__ == "__main__":
    main()
