"""SynthVQA-Video: seeded short clips of moving shapes with questions that need more than one frame.

A clip is ``FRAMES`` (8) frames on the SynthVQA canvas (192x192, the same 4x4 grid of cells, colours and
shapes as :mod:`vtprune.eval.synthetic.synthvqa`). The scene changes only between frame pairs: frames
``2t`` and ``2t+1`` are identical, so each of Qwen2-VL's 2-frame tubelets sees one still state (``STEPS``
= 4 states per clip). Objects move by one cell between states, and some enter or leave the clip. Three
balanced question types, single-word answers:

* ``motion``  "which way does the red circle move ?"              left/right/up/down
* ``frame``   "is the red circle in the last frame ?"             yes/no; the object is always in the clip,
                                                                  so only *when* it is visible decides
* ``count``   "how many objects appear in the video ?"            1..4; with two or more objects no single
                                                                  state shows all of them

Item ``i`` depends only on (split, seed, i); question types cycle motion/frame/count and answers cycle
through each type's answer space, so a multiple of 12 items is exactly balanced.

Example:
    >>> items = generate_synthvqa_video(12, seed=0)
    >>> [it["qtype"] for it in items[:3]], len(items[0]["frames"]), items[0]["frames"][0].size
    (['motion', 'frame', 'count'], 8, (192, 192))
    >>> score_synthvqa(items, [it["answer"] for it in items])["accuracy"]
    1.0
"""

from __future__ import annotations

import random

from PIL import Image

from .synthvqa import DEFAULT_IMAGE_SIZE, score_synthvqa
from .synthvqa_scenes import COLOURS, GRID, SHAPES, SIZES, SceneObject, layout_objects, render_scene

__all__ = [
    "FRAMES",
    "STEPS",
    "VIDEO_ANSWER_SPACE",
    "VIDEO_QTYPES",
    "VIDEO_WORDS",
    "build_video_prompt",
    "generate_synthvqa_video",
    "score_synthvqa",
    "video_prompt_parts",
]

FRAMES = 8  # frames per clip; Qwen2-VL packs 2-frame tubelets, so the scene changes every 2 frames
STEPS = FRAMES // 2  # distinct scene states per clip
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (d_row, d_col)
VIDEO_QTYPES = ("motion", "frame", "count")
VIDEO_ANSWER_SPACE: dict[str, tuple[str, ...]] = {
    "motion": tuple(DIRECTIONS),
    "frame": ("yes", "no"),
    "count": ("1", "2", "3", "4"),
}
# Words of the video questions/answers missing from the image vocabulary (appended after it, so the ids
# of the image words stay those of the image model the video model starts from).
VIDEO_WORDS = (
    "which",
    "way",
    "does",
    "move",
    "right",
    "up",
    "down",
    "first",
    "last",
    "frame",
    "appear",
    "video",
)

_PREFIX = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


def video_prompt_parts() -> tuple[str, str]:
    """(prefix, suffix) of the Qwen2-VL video prompt; the prefix holds the single video placeholder.

    Example:
        >>> video_prompt_parts()[0]
        '<|im_start|>user\\n<|vision_start|><|video_pad|><|vision_end|>'
    """
    return _PREFIX, _SUFFIX


def build_video_prompt(question: str) -> str:
    """The Qwen2-VL image prompt of :func:`~vtprune.eval.synthetic.synthvqa.build_prompt` with the video
    placeholder instead of the image one (training and evaluation use this one function).

    Example:
        >>> build_video_prompt("how many objects appear in the video ?").endswith("assistant\\n")
        True
    """
    return f"{_PREFIX}{question.strip()}{_SUFFIX}"


# ---------------------------------------------------------------------------------------------------------
# clip sampling: a clip is a list of tracks; a track is one object with a cell per state (None = absent)
# ---------------------------------------------------------------------------------------------------------


def _specs(rng: random.Random, n: int, first: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    """``n`` distinct (colour, shape) pairs, ``first`` (if given) at index 0."""
    pool = [(c, s) for c in COLOURS for s in SHAPES if (c, s) != first]
    rng.shuffle(pool)
    return ([first] if first else []) + pool[: n - (1 if first else 0)]


def _free(tracks: list[list], step: int, cell) -> bool:
    return all(t[step] != cell for t in tracks)


def _moving_track(rng: random.Random, direction: str, tracks: list[list]) -> list | None:
    """Cells of an object that moves 1-3 cells in ``direction`` (one cell at some state changes)."""
    dr, dc = DIRECTIONS[direction]
    moves = rng.randint(1, STEPS - 1)
    when = set(rng.sample(range(1, STEPS), moves))
    # start so that the whole path stays on the grid
    rows = range(GRID) if dr == 0 else (range(GRID - moves) if dr > 0 else range(moves, GRID))
    cols = range(GRID) if dc == 0 else (range(GRID - moves) if dc > 0 else range(moves, GRID))
    r, c = rng.choice(list(rows)), rng.choice(list(cols))
    path = []
    for step in range(STEPS):
        if step in when:
            r, c = r + dr, c + dc
        path.append((r, c))
    if all(_free(tracks, s, cell) for s, cell in enumerate(path)):
        return path
    return None


def _static_track(rng: random.Random, tracks: list[list], visible: range) -> list | None:
    cell = (rng.randrange(GRID), rng.randrange(GRID))
    if not all(_free(tracks, s, cell) for s in visible):
        return None
    return [cell if s in visible else None for s in range(STEPS)]


def _distractors(rng: random.Random, tracks: list[list], n: int) -> None:
    """Add ``n`` static or moving, always visible objects to ``tracks`` (cells stay distinct per state)."""
    while len(tracks) < n:
        if rng.random() < 0.5:
            track = _moving_track(rng, rng.choice(tuple(DIRECTIONS)), tracks)
        else:
            track = _static_track(rng, tracks, range(STEPS))
        if track is not None:
            tracks.append(track)


def _interval(rng: random.Random) -> range:
    start = rng.randrange(STEPS)
    return range(start, rng.randint(start + 1, STEPS))


def _clip_motion(rng: random.Random, answer: str):
    n = rng.randint(1, 3)
    while True:
        tracks: list[list] = []
        track = _moving_track(rng, answer, tracks)
        if track is None:
            continue
        tracks.append(track)
        _distractors(rng, tracks, n)
        specs = _specs(rng, n)
        colour, shape = specs[0]
        return tracks, specs, f"which way does the {colour} {shape} move ?"


def _clip_frame(rng: random.Random, answer: str):
    which = rng.choice(("first", "last"))
    step = 0 if which == "first" else STEPS - 1
    n = rng.randint(1, 3)
    while True:
        visible = _interval(rng)
        if (step in visible) != (answer == "yes"):
            continue
        tracks: list[list] = []
        track = _static_track(rng, tracks, visible)
        if track is None:
            continue
        tracks.append(track)
        # distractors also come and go, so "is anything there" does not answer the question
        while len(tracks) < n:
            other = _static_track(rng, tracks, _interval(rng))
            if other is not None:
                tracks.append(other)
        specs = _specs(rng, n)
        colour, shape = specs[0]
        return tracks, specs, f"is the {colour} {shape} in the {which} frame ?"


def _clip_count(rng: random.Random, answer: str):
    n = int(answer)
    while True:
        tracks: list[list] = []
        while len(tracks) < n:
            track = _static_track(rng, tracks, _interval(rng))
            if track is not None:
                tracks.append(track)
        shown = [sum(t[s] is not None for t in tracks) for s in range(STEPS)]
        if n == 1 or max(shown) < n:  # counting one frame is never enough
            return tracks, _specs(rng, n), "how many objects appear in the video ?"


_BUILDERS = {"motion": _clip_motion, "frame": _clip_frame, "count": _clip_count}


def _render(tracks: list[list], specs: list[tuple[str, str]], sizes: list[str], image_size: int, rng):
    """Per state: the visible objects (as dicts) and the rendered frame."""
    states, frames = [], []
    for step in range(STEPS):
        objects = [
            SceneObject(shape=s, colour=c, size=size, row=t[step][0], col=t[step][1])
            for t, (c, s), size in zip(tracks, specs, sizes)
            if t[step] is not None
        ]
        objects = layout_objects(objects, image_size, rng)
        states.append([o.to_dict() for o in objects])
        frames.append(render_scene(objects, image_size))
    return states, frames


def generate_synthvqa_video(
    n: int,
    seed: int = 0,
    split: str = "test",
    start: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    questions_per_clip: int = 1,
) -> list[dict]:
    """Generate ``n`` clips deterministically; item ``i`` depends only on (split, seed, i), not on ``n``.

    Each item: ``id, frames`` (``FRAMES`` PIL RGB images, equal in pairs), ``question, answer, qtype,
    choices, states`` (per scene state, the visible objects with shape, colour, size, row, col, bbox)
    and ``focus``: ``(state, object name)`` pairs holding the evidence (for ``motion``: the named object
    in the first then the last state; ``frame``: the object in the asked state when it is there, else
    wherever it is; ``count``: every object in every state it is visible in). With ``questions_per_clip
    > 1`` an item also has ``extra``: up to that many minus one further {question, answer, qtype, focus}
    about the same clip (used to pack questions behind one clip encoding during training).

    Example:
        >>> item = generate_synthvqa_video(1, seed=0)[0]
        >>> item["question"], item["answer"] in item["choices"]
        ('which way does the green cross move ?', True)
    """
    items = []
    for i in range(start, start + n):
        rng = random.Random(f"synthvqa-video:{split}:{seed}:{i}")  # str seeds: stable across runs
        qtype = VIDEO_QTYPES[i % len(VIDEO_QTYPES)]
        space = VIDEO_ANSWER_SPACE[qtype]
        answer = space[(i // len(VIDEO_QTYPES)) % len(space)]
        tracks, specs, question = _BUILDERS[qtype](rng, answer)
        sizes = [rng.choice(tuple(SIZES)) for _ in tracks]
        states, stills = _render(tracks, specs, sizes, image_size, rng)
        item = {
            "id": f"synthvqa-video-{split}-{seed}-{i:07d}",
            "frames": [still for still in stills for _ in range(2)],
            "question": question,
            "answer": answer,
            "qtype": qtype,
            "choices": list(space),
            "states": states,
            "focus": _focus(qtype, tracks, specs, question),
        }
        if questions_per_clip > 1:
            item["extra"] = _extra_questions(rng, tracks, specs, questions_per_clip - 1, question)
        items.append(item)
    return items


def _focus(qtype: str, tracks: list[list], specs: list[tuple[str, str]], question: str, k: int = 0):
    """Where the answer's evidence is: ``(state, "colour shape")`` pairs about track ``k``."""
    name = f"{specs[k][0]} {specs[k][1]}"
    if qtype == "motion":
        return [(0, name), (STEPS - 1, name)]
    if qtype == "frame":
        asked = 0 if " first " in question else STEPS - 1
        if tracks[k][asked] is not None:
            return [(asked, name)]
        return [(s, name) for s in range(STEPS) if tracks[k][s] is not None]
    return [(s, f"{c} {sh}") for t, (c, sh) in zip(tracks, specs) for s in range(STEPS) if t[s] is not None]


def _direction(track: list) -> str | None:
    """The direction of a track that moved (moving tracks go one way only), None if it stayed put."""
    (r0, c0), (r1, c1) = track[0], track[-1]
    if (r0, c0) == (r1, c1):
        return None
    return next(d for d, (dr, dc) in DIRECTIONS.items() if (r1 - r0) * dr + (c1 - c0) * dc > 0)


def _extra_questions(rng: random.Random, tracks, specs, k: int, skip: str) -> list[dict]:
    """Up to ``k`` further questions about one clip (every question the clip answers, shuffled)."""
    pool = []
    for j, (track, (colour, shape)) in enumerate(zip(tracks, specs)):
        if all(cell is not None for cell in track) and _direction(track):
            pool.append((f"which way does the {colour} {shape} move ?", _direction(track), "motion", j))
        for which, step in (("first", 0), ("last", STEPS - 1)):
            answer = "yes" if track[step] is not None else "no"
            pool.append((f"is the {colour} {shape} in the {which} frame ?", answer, "frame", j))
    pool.append(("how many objects appear in the video ?", str(len(tracks)), "count", 0))
    rng.shuffle(pool)
    return [
        {"question": q, "answer": a, "qtype": t, "focus": _focus(t, tracks, specs, q, j)}
        for q, a, t, j in pool
        if q != skip
    ][:k]


def clip_strip(item: dict, scale: float = 0.5) -> Image.Image:
    """The clip's distinct states side by side (for looking at an item).

    Example:
        >>> clip_strip(generate_synthvqa_video(1)[0]).size
        (384, 96)
    """
    stills = item["frames"][::2]
    w, h = (int(d * scale) for d in stills[0].size)
    strip = Image.new("RGB", (w * len(stills), h))
    for k, still in enumerate(stills):
        strip.paste(still.resize((w, h)), (k * w, 0))
    return strip
