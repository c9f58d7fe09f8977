"""Scene sampling, rendering and question construction for the SynthVQA task.

A scene is a plain canvas cut into a ``GRID x GRID`` grid of cells; a few objects (shape, colour, size)
sit in distinct cells. Every question is built *together with* its scene so that each question type has
a balanced answer distribution and every referenced object is unambiguous (colour+shape combinations are
unique within a scene). The public entry points live in :mod:`vtprune.eval.synthetic.synthvqa`; this module holds
the mechanics.

Example:
    >>> import random
    >>> rng = random.Random(0)
    >>> objects, question, answer, focus = make_question(rng, "count", answer_index=2)
    >>> answer
    '2'
    >>> image = render_scene(layout_objects(objects, 192, rng), image_size=192)
    >>> image.size
    (192, 192)
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

GRID = 4  # cells per side; 4 divides both tiny models' token grids (12x12 LLaVA, 8x8 merged Qwen2-VL)
MIN_OBJECTS, MAX_OBJECTS = 3, 7
BACKGROUND = (235, 235, 235)

# Saturated, well separated colours: the task is about *where* to look, not colour constancy.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 195, 0),
    "purple": (140, 40, 180),
}
# Four shapes whose silhouettes differ even at the 16-px patch granularity of the tiny models (a diamond
# was too close to a cross/square there); enough for counts up to 4 with unique colour+shape objects.
SHAPES = ("circle", "square", "triangle", "cross")
# Object extent as a fraction of the cell side: 29 or 43 px on the default 192-px canvas, i.e. about 2x2
# or 3x3 of the 144 LLaVA patch tokens; objects are centred in their cell (no jitter by default).
SIZES = {"small": 0.6, "large": 0.9}
COUNTS = ("0", "1", "2", "3", "4")
YES_NO = ("yes", "no")
QTYPES = ("exist", "attribute", "count", "spatial")
ANSWER_SPACE: dict[str, tuple[str, ...]] = {
    "exist": YES_NO,
    "attribute": tuple(COLOURS),
    "count": COUNTS,
    "spatial": YES_NO,
}
# Every word a question or an answer can contain (the tiny models' word-level vocabulary is built on it).
# Auxiliary, training-only question types. They key on what tiny models learn first (colour) and ask for
# what the benchmark questions then need (shape, absolute position), which pushes shape and position into
# the visual tokens early; the benchmark itself only uses QTYPES.
AUX_QTYPES = ("shape", "where")
ROWS_COLS = ("1", "2", "3", "4")
QUESTION_WORDS = (
    "is there a what color the how many objects are of left above ? shape object which row column in".split()
)


@dataclass(frozen=True)
class SceneObject:
    """One object: attributes plus its grid cell and pixel bounding box (x0, y0, x1, y1)."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)

    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def to_dict(self) -> dict:
        return asdict(self)


def task_vocabulary() -> list[str]:
    """All words of questions and answers, in a fixed order (no special or prompt tokens).

    Example:
        >>> "circle" in task_vocabulary() and "yes" in task_vocabulary()
        True
    """
    words: list[str] = []
    for group in (QUESTION_WORDS, SHAPES, tuple(COLOURS), COUNTS, ROWS_COLS, YES_NO):
        words.extend(w for w in group if w not in words)
    return words


# ---------------------------------------------------------------------------------------------------------
# scene sampling
# ---------------------------------------------------------------------------------------------------------


def _place(rng: random.Random, specs: list[tuple[str, str]]) -> list[SceneObject]:
    """Put (colour, shape) specs at distinct random cells with random sizes, in random order."""
    specs = list(specs)
    rng.shuffle(specs)
    cells = rng.sample(range(GRID * GRID), len(specs))
    return [
        SceneObject(shape=s, colour=c, size=rng.choice(tuple(SIZES)), row=cell // GRID, col=cell % GRID)
        for (c, s), cell in zip(specs, cells)
    ]


def _fill(rng: random.Random, specs: list[tuple[str, str]], n_total: int, allowed) -> list[tuple[str, str]]:
    """Add random unique (colour, shape) combos accepted by ``allowed`` until there are ``n_total``."""
    pool = [(c, s) for c in COLOURS for s in SHAPES if allowed(c, s) and (c, s) not in specs]
    rng.shuffle(pool)
    return specs + pool[: max(0, n_total - len(specs))]


def _random_specs(rng: random.Random, n: int) -> list[tuple[str, str]]:
    return _fill(rng, [], n, lambda c, s: True)


# ---------------------------------------------------------------------------------------------------------
# questions about a given scene: each returns (question, answer, focus), focus = indices of evidence objects
# ---------------------------------------------------------------------------------------------------------


def ask_exist(objects: list[SceneObject], rng: random.Random, yes: bool):
    """Existence question; negatives are adversarial (they share one attribute with a present object)."""
    i = rng.randrange(len(objects))
    if yes:
        return f"is there a {objects[i].name()} ?", "yes", [i]
    present = {(o.colour, o.shape) for o in objects}
    anchor = objects[i]
    near = [(c, anchor.shape) for c in COLOURS if c != anchor.colour]
    near += [(anchor.colour, s) for s in SHAPES if s != anchor.shape]
    near = [cs for cs in near if cs not in present]
    # Half of the time insist that the other attribute is present too (on another object), so that only
    # binding colour to shape answers the question, not the mere presence of a colour or a shape.
    colours_here = {c for c, _ in present}
    shapes_here = {s for _, s in present}
    binding = [cs for cs in near if cs[0] in colours_here and cs[1] in shapes_here]
    colour, shape = rng.choice(binding if binding and rng.random() < 0.5 else near)
    return f"is there a {colour} {shape} ?", "no", [i]


def _only_object_with(objects: list[SceneObject], rng: random.Random, attr: str, values, value=None):
    """``(value, index)`` of the one object whose ``attr`` is ``value`` (drawn among the values held by
    exactly one object when not given), or None when no value is unique."""
    if value is None:
        unique = [v for v in values if sum(getattr(o, attr) == v for o in objects) == 1]
        if not unique:
            return None
        value = rng.choice(unique)
    (i,) = [i for i, o in enumerate(objects) if getattr(o, attr) == value]
    return value, i


def ask_attribute(objects: list[SceneObject], rng: random.Random, shape: str | None = None):
    """Colour of a shape that occurs exactly once (None when the scene has no unique shape)."""
    found = _only_object_with(objects, rng, "shape", SHAPES, shape)
    if found is None:
        return None
    shape, i = found
    return f"what color is the {shape} ?", objects[i].colour, [i]


def ask_count(objects: list[SceneObject], rng: random.Random, colour: str | None = None):
    """Number of objects of a colour; without ``colour``, first draw a count value present in the scene."""
    if colour is None:
        by_count: dict[int, list[str]] = {}
        for c in COLOURS:
            by_count.setdefault(sum(o.colour == c for o in objects), []).append(c)
        # draw the *count* uniformly, then a colour with that count, to flatten the 0/1-heavy prior
        colour = rng.choice(by_count[rng.choice(sorted(by_count))])
    focus = [i for i, o in enumerate(objects) if o.colour == colour]
    return f"how many {colour} objects are there ?", str(len(focus)), focus


def ask_spatial(objects: list[SceneObject], rng: random.Random, yes: bool):
    """Is A left of / above B; A and B never share the compared column/row (None if no such pair)."""
    relation = rng.choice(("left of", "above"))
    axis = "col" if relation == "left of" else "row"
    pairs = [
        (i, j)
        for i in range(len(objects))
        for j in range(len(objects))
        if getattr(objects[i], axis) < getattr(objects[j], axis)
    ]
    if not pairs:
        return None
    i, j = rng.choice(pairs)  # objects[i] is strictly left of / above objects[j]
    if not yes:
        i, j = j, i
    return f"is the {objects[i].name()} {relation} the {objects[j].name()} ?", "yes" if yes else "no", [i, j]


def ask_shape(objects: list[SceneObject], rng: random.Random):
    """(auxiliary) Shape of the only object of some colour (None when no colour is unique)."""
    found = _only_object_with(objects, rng, "colour", COLOURS)
    if found is None:
        return None
    colour, i = found
    return f"what shape is the {colour} object ?", objects[i].shape, [i]


def ask_where(objects: list[SceneObject], rng: random.Random):
    """(auxiliary) Row or column (1..4, from the top / left) of an object named by colour and shape."""
    i = rng.randrange(len(objects))
    axis = rng.choice(("row", "column"))
    value = objects[i].row if axis == "row" else objects[i].col
    return f"which {axis} is the {objects[i].name()} in ?", ROWS_COLS[value], [i]


def ask(objects: list[SceneObject], rng: random.Random, qtype: str):
    """One more random question of ``qtype`` about an existing scene (answers balanced where possible).

    Returns ``(question, answer, focus)`` or None when the scene admits no such question.
    """
    if qtype == "exist":
        return ask_exist(objects, rng, yes=rng.random() < 0.5)
    if qtype == "attribute":
        return ask_attribute(objects, rng)
    if qtype == "count":
        return ask_count(objects, rng)
    if qtype == "shape":
        return ask_shape(objects, rng)
    if qtype == "where":
        return ask_where(objects, rng)
    return ask_spatial(objects, rng, yes=rng.random() < 0.5)


# ---------------------------------------------------------------------------------------------------------
# scene + question built together so that the answer is a prescribed value (exact answer balance)
# ---------------------------------------------------------------------------------------------------------


def make_question(
    rng: random.Random,
    qtype: str,
    answer_index: int,
    n_objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
):
    """Sample a scene and a ``qtype`` question whose answer is ``ANSWER_SPACE[qtype][answer_index]``.

    ``n_objects`` bounds the number of objects (a smaller range gives an easier training curriculum; count
    answers above its upper bound are then replaced). Returns ``(objects, question, answer, focus)`` with
    grid positions set but no pixel boxes yet (see :func:`layout_objects`); ``focus`` indexes the objects carrying the evidence (for a negative existence
    question: the present object the distractor was derived from).

    Example:
        >>> objs, q, a, focus = make_question(random.Random(1), "count", answer_index=2)
        >>> a, sum(o.colour == q.split()[2] for o in objs)
        ('2', 2)
    """
    space = ANSWER_SPACE[qtype]
    answer = space[answer_index % len(space)]
    lo, hi = n_objects
    if not 1 <= lo <= hi <= GRID * GRID:
        raise ValueError(f"n_objects must satisfy 1 <= lo <= hi <= {GRID * GRID}, got {n_objects}")
    n = rng.randint(lo, hi)
    if qtype == "attribute":
        shape = rng.choice(SHAPES)
        # the asked shape must be unique in the scene, otherwise "the <shape>" is ambiguous
        objects = _place(rng, _fill(rng, [(answer, shape)], n, lambda c, s: s != shape))
        return (objects, *ask_attribute(objects, rng, shape))
    if qtype == "count":
        k, colour = int(answer), rng.choice(tuple(COLOURS))
        k = k if k <= hi else rng.randint(0, hi)  # only with a small n_objects (training curriculum)
        specs = [(colour, s) for s in rng.sample(SHAPES, k)]
        objects = _place(rng, _fill(rng, specs, max(n, k), lambda c, s: c != colour))
        return (objects, *ask_count(objects, rng, colour))
    if qtype == "spatial":
        n = max(n, 2)  # a relation needs two objects
    while True:
        objects = _place(rng, _random_specs(rng, n))
        built = ask_exist(objects, rng, answer == "yes") if qtype == "exist" else None
        if qtype == "spatial":
            built = ask_spatial(objects, rng, answer == "yes")
        if built is not None:  # spatial needs two objects on different columns/rows: nearly always true
            return (objects, *built)


# ---------------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------------


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85  # visually similar area to the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        t = r * 0.38
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def layout_objects(
    objects: list[SceneObject], image_size: int, rng: random.Random, jitter: float = 0.0
) -> list[SceneObject]:
    """Give each object a pixel bounding box, centred in its cell (optionally offset by up to ``jitter``
    of the cell side). The default of no jitter keeps objects aligned with the tiny models' patch grids,
    which lets them learn the task within minutes of CPU training."""
    cell = image_size / GRID
    out = []
    for o in objects:
        r = cell * SIZES[o.size] / 2
        slack = max(0.0, cell / 2 - r - 1)
        shift = min(slack, cell * jitter)
        cx = (o.col + 0.5) * cell + rng.uniform(-shift, shift)
        cy = (o.row + 0.5) * cell + rng.uniform(-shift, shift)
        bbox = (int(cx - r), int(cy - r), int(round(cx + r)), int(round(cy + r)))
        out.append(SceneObject(o.shape, o.colour, o.size, o.row, o.col, bbox))
    return out


def render_scene(objects: list[SceneObject], image_size: int) -> Image.Image:
    """Draw laid-out objects (see :func:`layout_objects`) on a plain RGB canvas.

    Example:
        >>> objs = layout_objects([SceneObject("circle", "red", "large", 0, 0)], 96, random.Random(0))
        >>> render_scene(objs, 96).getpixel((12, 12))
        (220, 30, 30)
    """
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objects:
        x0, y0, x1, y1 = o.bbox
        _draw(draw, o.shape, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, COLOURS[o.colour])
    return image
