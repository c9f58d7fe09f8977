"""SynthVQA, the seeded offline visual question task, and the tiny models trained on it.

``synthvqa`` (items, prompts, scoring) and ``synthvqa_scenes`` (scenes, rendering, questions) make the
task; ``tiny_models`` builds and loads the shipped tiny LLaVA-1.5 / Qwen2-VL models; ``train_tiny``
(``python -m vtprune.eval.synthetic.train_tiny``) trains them, with the training-only losses of
``train_aux``. ``synthvqa_video`` is the video split (8-frame clips of moving shapes) for the tiny
Qwen2-VL video model (``train_tiny --media video``; its README text in ``video_readme``).
"""
