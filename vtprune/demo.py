"""``vtprune demo``: the main job on the embedded default model, no download needed.

Loads the tiny LLaVA-1.5-architecture model shipped with the package (trained on the offline
synthetic VQA task), asks image questions with and without pruning for each method, and prints
the answers, visual tokens per decoder layer, counted prefill FLOPs and prefill time saved
(paired and repeated like the prefill benchmark, and still only indicative on a shared machine).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

import vtprune
from vtprune.flops import count_flops

DEFAULT_METHODS = [
    "fastv",
    "pdrop",
    "hired",
    "visionzip",
    "mustdrop",
    "layerskip",
    "divprune",
    "cdpruner",
    "todre",
    "sparsevlm",
    "flowcut",
    "zerotprune",
    "dart",
    "transprune",
    "temporal",
    "vscan",
    "vflowopt",
    "random",
    "uniform",
]


def load_default(arch: str = "llava"):
    """The tiny trained checkpoint shipped in ``vtprune/assets``: ``(model, processor, source)``."""
    import os

    from vtprune.eval.synthetic.tiny_models import asset_dir, load_tiny

    path = asset_dir(arch)
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(
            f"the embedded tiny {arch} checkpoint is missing from {path}; reinstall vtprune or retrain it "
            f"with the command in its README (python -m vtprune.eval.synthetic.train_tiny ... --out {path})"
        )
    model, processor = load_tiny(arch)
    return model, processor, f"shipped checkpoint {path}"


def _encode(processor, items, arch: str):
    from vtprune.eval.synthetic.synthvqa import build_prompt
    from vtprune.eval.synthetic.synthvqa_video import build_video_prompt

    processor.tokenizer.padding_side = "left"
    if "frames" in items[0]:  # SynthVQA-Video clips (the qwen2_vl_video model)
        media = {"videos": [it["frames"] for it in items]}
        text = [build_video_prompt(it["question"]) for it in items]
    else:
        media = {"images": [it["image"] for it in items]}
        text = [build_prompt(it["question"], arch) for it in items]
    return processor(**media, text=text, return_tensors="pt", padding=True)


def _answers(model, processor, enc) -> list[str]:
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    return [
        a.strip()
        for a in processor.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    ]


def _prefill(model, enc):
    with torch.inference_mode():
        return model(**enc, logits_to_keep=1)


def compress_counts(counts: list[float]) -> str:
    """``[64, 64, 16, 16, 16]`` -> ``"64x2 16x3"``: tokens per layer, run-length encoded.

    Example:
        >>> compress_counts([64.0, 64.0, 16.0])
        '64x2 16x1'
    """
    runs: list[list] = []
    for c in counts:
        c = round(c, 1)
        if runs and runs[-1][0] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    return " ".join(f"{c:g}x{k}" for c, k in runs)


def run_demo(
    arch: str = "llava", keep: float = 0.5, methods=None, n: int = 32, seed: int = 1, repeats: int = 5
) -> list[dict]:
    """Compare the unpruned model with each method at ``keep`` on ``n`` held-out questions.

    Prefill time is taken as the prefill benchmark takes it (:func:`vtprune.eval.speed.bench_prefill.time_plans`):
    a warm-up run of each plan, then ``repeats`` rounds in which every plan runs between two
    runs of the unpruned model; time saved is ``1 - 1 / median paired speedup``.
    """
    from vtprune.eval.speed.bench_prefill import time_plans
    from vtprune.eval.synthetic.synthvqa import generate_synthvqa, score_synthvqa
    from vtprune.eval.synthetic.synthvqa_video import generate_synthvqa_video

    if repeats < 1:
        raise ValueError(f"demo: repeats must be at least 1, got {repeats}")
    methods = methods or DEFAULT_METHODS
    model, processor, source = load_default(arch)
    generate = generate_synthvqa_video if arch == "qwen2_vl_video" else generate_synthvqa  # clips for it
    arch = "qwen2_vl" if model.config.model_type == "qwen2_vl" else "llava"  # the prompt format
    items = generate(n, seed=seed, split="demo")
    enc = _encode(processor, items, arch)
    one = _encode(processor, items[:1], arch)
    print(f"vtprune demo: {type(model).__name__} ({source})")
    print(f"question 1: {items[0]['question']!r}  (truth: {items[0]['answer']})")
    rows = []
    for plan in ["baseline", *methods]:
        if plan == "baseline":
            vtprune.remove(model)
        else:
            vtprune.apply(model, plan, keep=keep)
        answers = []
        for i in tqdm(range(0, n, 16), desc=plan, leave=False):
            answers += _answers(model, processor, _encode(processor, items[i : i + 16], arch))
        acc = score_synthvqa(items, answers)["accuracy"]
        flops, _ = count_flops(_prefill, model, one)
        if plan == "baseline":
            media_ids = (model.config.image_token_id, getattr(model.config, "video_token_id", None))
            n_visual = sum(int((one["input_ids"][0] == t).sum()) for t in media_ids if t is not None)
            per_layer = [n_visual] * model.config.text_config.num_hidden_layers
        else:
            per_layer = vtprune.stats(model).visual_tokens_per_layer
        rows.append(dict(plan=plan, answer=answers[0], accuracy=acc, flops=flops, per_layer=per_layer))
    plans = {r["plan"]: "baseline" if r["plan"] == "baseline" else f"{r['plan']}:keep={keep}" for r in rows}
    timing = time_plans(model, dict(enc), list(plans.values()), repeats=repeats, warmup=1)
    for r in rows:
        t = timing[plans[r["plan"]]]
        r.update(
            seconds=t["median_s"],
            paired_speedups=t["paired_speedups"],
            time_saved=1 - 1 / t["measured_speedup"],
        )
    vtprune.remove(model)
    _print(rows, keep, n, repeats)
    return rows


def _print(rows: list[dict], keep: float, n: int, repeats: int) -> None:
    base = rows[0]
    print(
        f"\nkeep={keep}; accuracy on {n} held-out questions; FLOPs: one prefill of question 1 (exact);\n"
        f"prefill ms: median of {repeats} runs of a batch of {n} after a warm-up, each plan between two "
        "unpruned runs;\ntime saved: median of those paired ratios. Time is indicative only: it depends "
        "on this machine and on what else runs on it.\n"
    )
    head = f"{'plan':<10} {'answer 1':<10} {'accuracy':>8} {'GFLOPs':>8} {'saved':>6} {'prefill ms':>10} {'saved':>6}  visual tokens per layer"
    print(head)
    print("-" * len(head))
    for r in rows:
        fl_saved = 1 - r["flops"] / base["flops"]
        layers = compress_counts(r["per_layer"])
        print(
            f"{r['plan']:<10} {r['answer']:<10} {r['accuracy']:>8.2%} {r['flops'] / 1e9:>8.3f} {fl_saved:>6.0%} "
            f"{1e3 * r['seconds']:>10.1f} {r['time_saved']:>6.0%}  {layers}"
        )
