"""One job: the unpruned model and every plan on the same samples, scored, metered, resumable.

For each task and each plan (``"baseline"`` first, always), the samples not yet finished are
answered by batched greedy generation with left padding, and each batch's records are appended
to ``OUT/<task>/<plan>.jsonl`` as soon as it is done, so an interrupted run resumes where it
stopped. Under ``accelerate launch`` every rank takes the strided shard ``samples[rank::world]``
and appends to ``OUT/<task>/<plan>.rank<k>.jsonl``; rank 0 waits for all, merges into
``OUT/<task>/<plan>.jsonl.gz`` (:mod:`vtprune.eval.harness.records`), scores, takes
the efficiency meters (:mod:`vtprune.eval.harness.meters`) and writes ``OUT/results.json``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

import vtprune
from vtprune.eval.harness.generation import answer_batch, encode, load_model, model_source
from vtprune.eval.harness.meters import measure_plans
from vtprune.eval.harness.plans import apply_plan, plan_config
from vtprune.eval.harness.records import append_records, finished, merge_shards, merged_path, records_path
from vtprune.eval.harness.tasks import chat_prompt, load_task, parse_task, parser_name, score_task


def _run_plan(ctx: dict, task: str, plan: str, shard: list, parser: str) -> None:
    rank = ctx["rank"] if ctx["world"] > 1 else None
    path = records_path(ctx["output"], task, plan, rank)
    done = finished(ctx["output"], task, plan, rank)
    todo = [s for s in shard if s.sample_id not in done]
    bar = tqdm(total=len(shard), initial=len(shard) - len(todo), desc=f"{task} {plan}", disable=ctx["quiet"])
    if todo:
        apply_plan(ctx["model"], plan)
    try:
        for i in range(0, len(todo), ctx["batch_size"]):
            batch = todo[i : i + ctx["batch_size"]]
            prompts, answers = answer_batch(ctx["model"], ctx["processor"], batch, ctx["max_new_tokens"])
            records = [
                {
                    "task": task,
                    "plan": plan,
                    "sample_id": s.sample_id,
                    "prompt": p,
                    "question": s.question,
                    "prediction": a,
                    "answers": s.answers,
                    "parser": parser,
                    "rank": ctx["rank"],
                }
                for s, p, a in zip(batch, prompts, answers)
            ]
            append_records(path, records)  # flushed per batch: the resume point
            bar.update(len(batch))
    finally:
        bar.close()
        vtprune.remove(ctx["model"])


def _compare(records: dict[str, dict], base: dict[str, dict]) -> float | None:
    common = [sid for sid in records if sid in base]
    if not common:
        return None
    return sum(records[s]["prediction"] == base[s]["prediction"] for s in common) / len(common)


def _finish_task(
    ctx: dict, task: str, samples: list, plans: list[str], score_opts: dict, parser: str
) -> dict:
    order = [s.sample_id for s in samples]
    merged = {
        p: {r["sample_id"]: r for r in merge_shards(ctx["output"], task, p, ctx["world"], order)}
        for p in plans
    }
    meters = _task_meters(ctx, task, samples, plans)
    example = next(iter(merged["baseline"].values()), {}).get("prompt")
    out = {"n_samples": len(samples), "parser": parser, "prompt_example": example, "plans": {}}
    base_score = None
    for plan in plans:
        recs = merged[plan]
        scored = [s for s in samples if s.sample_id in recs]
        result = (
            score_task(task, scored, {s: r["prediction"] for s, r in recs.items()}, **score_opts)
            if scored
            else {}
        )
        main = result.get("main_score")
        if plan == "baseline":
            base_score = main
        kept = main / base_score if main is not None and base_score else None
        out["plans"][plan] = {
            "plan": plan,
            "n": len(recs),
            "score": result,
            "main_metric": result.get("main_metric"),
            "main_score": main,
            "accuracy_kept": kept,
            "loyalty": _compare(recs, merged["baseline"]),
            "parser": result.get("parser", parser),
            "records": str(merged_path(".", task, plan)),
            "meters": meters.get(plan),
        }
    return out


def _task_meters(ctx: dict, task: str, samples: list, plans: list[str]) -> dict:
    if not ctx["meters"] or not samples:
        return {}
    cache = Path(ctx["output"]) / task / "meters.json"
    cached = json.loads(cache.read_text()) if ctx["resume"] and cache.is_file() else {}
    if all(p in cached for p in plans):
        return cached
    first = [s for s in samples if s.image is not None][: ctx["meter_batch"]] or samples[: ctx["meter_batch"]]
    prompts = [chat_prompt(ctx["processor"], s.prompt, s.image is not None) for s in first]
    images = [s.load_image() for s in first if s.image is not None] or None
    inputs = encode(ctx["processor"], prompts, images, next(ctx["model"].parameters()).device)
    result = measure_plans(ctx["model"], inputs, plans, **ctx["meter_opts"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({**cached, **result}, indent=1))  # plans not asked for now stay
    return result


def run_eval(
    model_id_or_dir,
    tasks: list[str],
    data_dir: str | Path | None,
    plans: list[str],
    output: str | Path,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    resume: bool = True,
    device: str = "auto",
    dtype: str = "auto",
    meters: bool = True,
    meter_repeats: int = 5,
    meter_warmup: int = 1,
    meter_batch: int = 1,
    decode_tokens: int = 8,
    progress: bool = True,
) -> dict | None:
    """Evaluate the unpruned model and every plan on ``tasks``; write records and ``results.json``.

    ``model_id_or_dir``: a folder, hub id, shipped tiny name, or a ``(model, processor)`` pair.
    ``tasks``: names, optionally with options (``"pope:parser=lenient,splits=random"``).
    ``plans``: ``"name:opt=value,..."`` strings (``"baseline"`` is always evaluated first).
    Returns the results on the main process, ``None`` on the other ranks.

    Example:
        >>> r = run_eval("llava", ["synthvqa"], None, ["pdrop:keep=0.25"], "out/eval", limit=40)  # doctest: +SKIP
        >>> r["tasks"]["synthvqa"]["plans"]["pdrop:keep=0.25"]["accuracy_kept"]  # doctest: +SKIP
        0.93
    """
    from accelerate import PartialState

    # everything that can be checked without the model fails now, not after hours of evaluation
    if not isinstance(model_id_or_dir, tuple):
        model_source(model_id_or_dir)  # a folder that does not exist: "no such folder or hub id"
    plans = ["baseline", *[p for p in dict.fromkeys(plans) if p != "baseline"]]
    for plan in plans:
        plan_config(plan)  # each method config's own option checks, as vtprune.apply runs them
    loaded = []
    for name, read_opts, score_opts in [parse_task(t) for t in tasks]:  # every task's files, first
        samples = load_task(name, data_dir, limit, **read_opts)
        loaded.append((name, samples, score_opts, parser_name(name, samples, **score_opts)))
    # PartialState only sets up CPU process groups when told so (the env flag is read by
    # AcceleratorState alone); without it, ranks launched on a GPU-less host would all be rank 0
    cpu = str(device).startswith("cpu") or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    state = PartialState(cpu=cpu or not torch.cuda.is_available())
    if device == "auto":
        device = state.device
    if torch.device(device).type == "cpu" and state.num_processes > 1:
        # ranks share the cores: oversubscribed OpenMP threads would slow every rank down
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
    if isinstance(model_id_or_dir, tuple):
        model, processor = model_id_or_dir
    else:
        model, processor = load_model(model_id_or_dir, device, dtype)
    output = Path(output)
    ctx = dict(
        model=model,
        processor=processor,
        output=output,
        rank=state.process_index,
        world=state.num_processes,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        quiet=not progress or not state.is_main_process,
        meters=meters,
        resume=resume,
        meter_batch=meter_batch,
        meter_opts=dict(repeats=meter_repeats, warmup=meter_warmup, decode_tokens=decode_tokens),
    )
    for plan in plans:  # what depends on the model (layer indices, ...) also fails before the baseline runs
        try:
            apply_plan(model, plan)
        except ValueError as err:
            raise ValueError(f"plan {plan!r} does not fit this model: {err}") from err
        finally:
            vtprune.remove(model)
    if not resume:
        _clear(ctx, [name for name, *_ in loaded], plans, state.is_main_process)
    state.wait_for_everyone()  # nobody reads files another rank is still clearing
    _check_config(output, _run_config(model_id_or_dir, model, max_new_tokens), state.is_main_process)
    for name, samples, _, parser in loaded:
        for plan in plans:
            _run_plan(ctx, name, plan, samples[state.process_index :: state.num_processes], parser)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    results = _header(model_id_or_dir, model, ctx, plans, data_dir, limit)
    for name, samples, score_opts, parser in loaded:
        results["tasks"][name] = _finish_task(ctx, name, samples, plans, score_opts, parser)
        write_json(output / "results.json", results)  # after each task: partial results survive
    return results


def _run_config(source, model, max_new_tokens: int) -> dict:
    name = str(source) if not isinstance(source, tuple) else type(model).__name__
    return {"model": name, "dtype": str(model.dtype), "max_new_tokens": max_new_tokens}


def _check_config(output: Path, config: dict, main: bool) -> None:
    """Refuse to resume records made with another model, dtype or answer length (they would mix)."""
    path = output / "run_config.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != config:
            raise ValueError(
                f"{output} holds records of another run ({before}, now {config}); "
                "use another --output or --no-resume"
            )
    elif main:
        write_json(path, config)


def _clear(ctx: dict, tasks: list[str], plans: list[str], main: bool) -> None:
    for task in tasks:
        paths = [records_path(ctx["output"], task, p, ctx["rank"]) for p in plans]
        if main:
            paths += [records_path(ctx["output"], task, p) for p in plans]
            paths += [merged_path(ctx["output"], task, p) for p in plans]
            paths += [Path(ctx["output"]) / task / "meters.json", Path(ctx["output"]) / "run_config.json"]
        for p in paths:
            p.unlink(missing_ok=True)


def _header(source, model, ctx, plans, data_dir, limit) -> dict:
    import transformers

    name = source if not isinstance(source, tuple) else type(model).__name__
    return {
        "model": str(name),
        "model_class": type(model).__name__,
        "device": str(next(model.parameters()).device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "plans": plans,
        "data_dir": str(data_dir),
        "limit": limit,
        "world_size": ctx["world"],
        "batch_size": ctx["batch_size"],
        "generation": {"do_sample": False, "max_new_tokens": ctx["max_new_tokens"], "padding_side": "left"},
        "versions": {
            "vtprune": vtprune.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tasks": {},
    }


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


__all__ = ["run_eval", "write_json"]
