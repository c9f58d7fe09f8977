"""Loading a VLM checkpoint and answering batches of prompts with greedy, left-padded generation."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vtprune.eval.harness.tasks import chat_prompt

MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def model_source(model) -> str:
    """``model`` as ``from_pretrained`` should read it: a shipped tiny model's folder, a folder, a hub id.

    Anything else (a path that does not exist, such as ``/data/llava`` or ``./ckpt``) raises
    ``FileNotFoundError("no such folder or hub id: ...")`` instead of the hub's "Repo id must
    be ..." message.

    Example:
        >>> model_source("llava-hf/llava-1.5-7b-hf")
        'llava-hf/llava-1.5-7b-hf'
        >>> model_source("/no/such/llava")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no such folder or hub id: '/no/such/llava' (a folder with the model's config.json, a hub id 'org/name', or a shipped tiny model: llava, qwen2_vl, llava_noattn, qwen2_vl_video)
    """
    from vtprune.eval.synthetic.tiny_models import ASSET_NAMES, asset_dir

    text = str(model)
    if text in ASSET_NAMES:
        return asset_dir(text)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if _HUB_ID.match(text) and ".." not in text and "--" not in text and not text.endswith("."):
        return text
    raise FileNotFoundError(
        f"no such folder or hub id: {text!r} (a folder with the model's config.json, a hub id "
        f"'org/name', or a shipped tiny model: {', '.join(ASSET_NAMES)})"
    )


def load_model(model_id_or_dir: str, device: str | torch.device = "cpu", dtype="auto"):
    """(model in eval mode on ``device``, processor) from a folder, a hub id, or a shipped tiny name.

    The class follows ``AutoConfig``'s ``model_type``; ``"llava"`` / ``"qwen2_vl"`` load the tiny
    checkpoints shipped with vtprune. ``dtype="auto"``: bfloat16 on CUDA, float32 elsewhere. A
    folder that does not exist, or a hub id that cannot be found, raises
    ``FileNotFoundError("no such folder or hub id: ...")``.

    Example:
        >>> model, processor = load_model("llava-hf/llava-1.5-7b-hf", "cuda")  # doctest: +SKIP
    """
    import transformers
    from transformers import AutoConfig, AutoProcessor

    device = torch.device(device)
    if dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    source = model_source(model_id_or_dir)
    try:
        model_type = AutoConfig.from_pretrained(source).model_type
    except OSError as err:
        if Path(source).is_dir():
            raise  # a folder without config.json: transformers names the missing file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"no such folder or hub id: {source!r} ({reason})") from err
    cls = getattr(transformers, MODEL_CLASSES.get(model_type, "AutoModelForImageTextToText"))
    model = cls.from_pretrained(source, dtype=dtype).to(device).eval()
    return model, AutoProcessor.from_pretrained(source)


def encode(processor, prompts: list[str], images: list | None, device) -> dict:
    """Processor output for a batch, left-padded (decoder-only generation needs the prompt ends aligned)."""
    processor.tokenizer.padding_side = "left"
    kwargs = {"images": images} if images else {}
    batch = processor(text=prompts, return_tensors="pt", padding=True, **kwargs)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def generate_answers(
    model, processor, prompts: list[str], images: list | None, max_new_tokens: int
) -> list[str]:
    """Greedy answers of one batch, special tokens dropped and whitespace stripped.

    Example:
        >>> generate_answers(model, processor, ["USER: <image>\\nhi ASSISTANT:"], [img], 8)  # doctest: +SKIP
        ['yes']
    """
    enc = encode(processor, prompts, images, next(model.parameters()).device)
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new = out[:, enc["input_ids"].shape[1] :]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


def answer_batch(model, processor, batch, max_new_tokens) -> tuple[list[str], list[str]]:
    """(exact prompts, answers) for a list of samples; image and text-only ones go in separate calls.

    Example:
        >>> prompts, answers = answer_batch(model, processor, samples[:8], max_new_tokens=16)  # doctest: +SKIP
    """
    prompts = [chat_prompt(processor, s.prompt, s.image is not None) for s in batch]
    answers: list[str] = [""] * len(batch)
    for with_image in (True, False):
        idx = [i for i, s in enumerate(batch) if (s.image is not None) == with_image]
        if idx:
            images = [batch[i].load_image() for i in idx] if with_image else None
            got = generate_answers(model, processor, [prompts[i] for i in idx], images, max_new_tokens)
            for i, a in zip(idx, got):
                answers[i] = a
    return prompts, answers
