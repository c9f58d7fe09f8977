"""lmms-eval model plugin: any lmms-eval task on a Hugging Face VLM pruned by vtprune.

lmms-eval (>= 0.7) finds external models through the ``lmms_eval.models`` entry-point group,
whose payload is a ``ModelManifest`` (or a callable returning some). vtprune registers
:func:`lmms_manifests`, which names the model class ``VtpruneLlavaHf`` of this module::

    lmms-eval --model vtprune_llava_hf \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=pdrop,keep=0.25 \\
        --tasks pope,mme --batch_size 1 --output_path logs/

Every option besides ``pretrained``, ``method`` and the loading options is a method option
(``layers=8+16+24``, ``ratio=0.5``, ``keep=0.25``). ``method=baseline`` (the default) runs the
unpruned model. LLaVA-1.5, LLaVA-NeXT and Qwen2-VL checkpoints all load (the class follows the
checkpoint's ``model_type``). lmms-eval is imported only when the class is first used, so this
module imports without it.
"""

from __future__ import annotations

import torch

MODEL_ID = "vtprune_llava_hf"
CLASS_PATH = f"{__name__}.VtpruneLlavaHf"


def lmms_manifests():
    """Entry-point payload for lmms-eval's model registry.

    Example:
        >>> lmms_manifests()[0].model_id  # doctest: +SKIP
        'vtprune_llava_hf'
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]


def plan_string(method: str | None, options: dict) -> str:
    """The vtprune plan for lmms-eval ``model_args`` (values as lmms-eval parsed them).

    Example:
        >>> plan_string("pdrop", {"layers": "8+16+24", "ratio": 0.5})
        'pdrop:layers=8+16+24,ratio=0.5'
        >>> plan_string(None, {})
        'baseline'
    """
    if not method or method in ("baseline", "none"):
        if options:
            raise ValueError(f"vtprune_llava_hf: options {sorted(options)} given without a method")
        return "baseline"
    return method + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")


def _strip_image_tokens(context: str) -> str:
    # lmms-eval contexts may carry "<image>"; the chat template places the images itself
    return context.replace("<image>", "").strip()


def _build_class():
    from accelerate import Accelerator
    from lmms_eval.api.model import lmms
    from tqdm import tqdm

    from vtprune.eval.harness.generation import encode, load_model
    from vtprune.eval.harness.plans import apply_plan
    from vtprune.eval.harness.tasks import chat_prompt

    class VtpruneLlavaHf(lmms):
        """lmms-eval model: a HF LLaVA / LLaVA-NeXT / Qwen2-VL checkpoint with a vtprune plan applied."""

        is_simple = True

        def __init__(self, pretrained: str, method: str | None = None, device: str = "auto", dtype="auto",
                     batch_size: int | str = 1, max_batch_size=None, **options) -> None:  # fmt: skip
            super().__init__()
            self.accelerator = Accelerator()
            if device == "auto":
                device = self.accelerator.device  # one GPU per rank under accelerate launch
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
            self.model, self.processor = load_model(pretrained, device, dtype)
            self.tokenizer = self.processor.tokenizer
            self.plan = plan_string(method, options)
            apply_plan(self.model, self.plan)
            self.batch_size = int(batch_size)

        @property
        def device(self):
            return next(self.model.parameters()).device

        def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
            doc = self.task_dict[task][split][doc_id]
            return [v for v in (doc_to_visual(doc) if doc_to_visual else []) or [] if v is not None]

        def generate_until(self, requests) -> list[str]:
            out: list[str] = []
            args = [r.args for r in requests]
            for start in tqdm(range(0, len(args), self.batch_size), disable=self.rank != 0, desc="vtprune"):
                chunk = args[start : start + self.batch_size]
                groups: dict[tuple, list[int]] = {}  # one generate call per (has images, kwargs)
                answers: list[str] = [""] * len(chunk)
                visuals = [self._visuals(c[2], c[3], c[4], c[5]) for c in chunk]
                for i, c in enumerate(chunk):
                    groups.setdefault((len(visuals[i]) > 0, repr(sorted(c[1].items()))), []).append(i)
                for idx in groups.values():
                    texts = self._generate(
                        [chunk[i][0] for i in idx], [visuals[i] for i in idx], dict(chunk[idx[0]][1])
                    )
                    for i, t in zip(idx, texts):
                        answers[i] = t
                out.extend(answers)
            return out

        def _generate(self, contexts: list[str], visuals: list[list], kwargs: dict) -> list[str]:
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            prompts = [
                chat_prompt(self.processor, _strip_image_tokens(c), len(v)) for c, v in zip(contexts, visuals)
            ]
            images = [img for v in visuals for img in v] or None
            enc = encode(self.processor, prompts, images, self.device)
            temperature = float(kwargs.get("temperature") or 0)
            gen = {
                "max_new_tokens": int(kwargs.get("max_new_tokens", 128)),
                "do_sample": temperature > 0,
                "num_beams": int(kwargs.get("num_beams") or 1),
                "pad_token_id": self.tokenizer.eos_token_id
                if self.tokenizer.pad_token_id is None
                else self.tokenizer.pad_token_id,
            }
            if temperature > 0:
                gen.update(temperature=temperature, top_p=kwargs.get("top_p") or 1.0)
            with torch.inference_mode():
                ids = self.model.generate(**enc, **gen)
            texts = self.processor.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for stop in until:  # lmms-eval's contract: cut at the first stop sequence
                texts = [t.split(stop)[0] if stop else t for t in texts]
            return [t.strip() for t in texts]

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            res = []
            for context, target, doc_to_visual, doc_id, task, split in tqdm(
                [r.args for r in requests], disable=self.rank != 0, desc="vtprune loglikelihood"
            ):
                doc = self.task_dict[task][split][doc_id]
                continuation = target if isinstance(target, str) else target(doc)
                visuals = self._visuals(doc_to_visual, doc_id, task, split)
                prompt = chat_prompt(self.processor, _strip_image_tokens(context), len(visuals))
                # both encodings expand the image placeholders the same way, so the context length
                # in tokens is the prompt's own encoded length
                ctx = encode(self.processor, [prompt], visuals or None, self.device)
                full = encode(self.processor, [prompt + continuation], visuals or None, self.device)
                n_cont = full["input_ids"].shape[1] - ctx["input_ids"].shape[1]
                with torch.inference_mode():
                    logits = self.model(**full).logits
                cont = full["input_ids"][0, -n_cont:]
                # the tail rows are text positions whatever visual tokens a plan removed
                logp = torch.log_softmax(logits[0, -n_cont - 1 : -1].float(), -1)
                res.append(
                    (float(logp.gather(1, cont[:, None]).sum()), bool((logp.argmax(-1) == cont).all()))
                )
            return res

        def generate_until_multi_round(self, requests) -> list[str]:
            raise NotImplementedError("vtprune_llava_hf: multi-round generation is not supported")

    # importable by name: lmms-eval (and pickling) look the class up as <module>.VtpruneLlavaHf
    VtpruneLlavaHf.__module__, VtpruneLlavaHf.__qualname__ = __name__, "VtpruneLlavaHf"
    return VtpruneLlavaHf


_CLASS = None


def __getattr__(name: str):
    # PEP 562: the class subclasses lmms_eval's base, so it is built (and lmms_eval imported)
    # only when lmms-eval's registry asks for it
    global _CLASS
    if name == "VtpruneLlavaHf":
        if _CLASS is None:
            _CLASS = _build_class()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
