"""A deterministic synthetic visual question answering dataset: coloured shapes, counts, positions and short
words drawn on small images, with questions whose answers are one exact word.

A :class:`Scene` holds 1-4 shapes (``circle`` / ``square`` / ``triangle``), each with a colour from
:data:`COLOURS` and a distinct slot from :data:`POSITIONS` (``left``, ``right``, ``top``, ``bottom``,
``centre``), and sometimes a word from :data:`WORDS` written in the top-left corner with Pillow's bitmap font.
No two shapes share both shape and colour. :func:`questions` lists every unambiguous question of a scene
and its answer, derived from the scene spec:

==========  ====================================  ==========
type        question                              answer
==========  ====================================  ==========
colour      What colour is the circle?            red
count       How many shapes are there?            3
position    Where is the blue square?             left
shape       What shape is green?                  triangle
word        What word is written?                 cat
==========  ====================================  ==========

Everything is seeded (:class:`random.Random`), so the same seed gives the same scenes, pixels and
questions on every machine. :func:`write_split` writes a LLaVA-style JSONL file plus PNG images that
``torchvlm finetune`` reads; :func:`eval_questions` gives single-question held-out items.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["COLOURS", "SHAPES", "POSITIONS", "WORDS", "QUESTION_TYPES", "EXTRA_QUESTION_TYPES", "IMAGE_SIZE", "Shape", "Scene",
           "random_scene", "example_scene", "render", "draw_shape", "questions", "question_for", "write_split", "eval_questions",
           "normalize_answer"]

#: side of the rendered images, in pixels: a 3 x 3 grid of 32 px cells, one per place (the word's corner
#: is the top-left cell)
IMAGE_SIZE = 96
#: the geometry (shape sizes, jitter, word position) is given in pixels of a 128 px image and scaled
REF_SIZE = 128
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
#: slot centres as fractions of the image side (x, y)
POSITIONS = {
    "left": (0.17, 0.5),
    "right": (0.83, 0.5),
    "top": (0.5, 0.17),
    "bottom": (0.5, 0.83),
    "centre": (0.5, 0.5),
}
WORDS = ("cat", "dog", "sun", "box", "hat", "cup", "key", "fox")
QUESTION_TYPES = ("colour", "count", "position", "shape", "word")
#: question types that only help training (the evaluation asks :data:`QUESTION_TYPES`): shapes of one kind or
#: colour counted ("How many circles are there?", "How many red shapes are there?") and yes / no questions
#: ("Is there a blue square?"). Each makes every image token check itself against the question, the
#: matching step that the colour / position / shape questions need, with the easy read-out of counting.
EXTRA_QUESTION_TYPES = ("count_kind", "count_colour", "exists")
#: chance that a scene carries a word
WORD_PROBABILITY = 0.5


@dataclass(frozen=True)
class Shape:
    """One shape of a scene: kind, colour name, slot name, half size in pixels (at :data:`REF_SIZE`)."""

    kind: str
    colour: str
    position: str
    half: int


@dataclass
class Scene:
    """What an image shows: its shapes, an optional word (drawn at ``word_xy``) and a background grey level."""

    shapes: list[Shape]
    word: str | None = None
    word_xy: tuple[int, int] = (4, 4)
    background: int = 255
    jitter: list[tuple[int, int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-able description (stored next to each sample, so answers can be re-derived)."""
        return {"shapes": [vars(s) for s in self.shapes], "word": self.word, "word_xy": list(self.word_xy),
                "background": self.background, "jitter": [list(j) for j in self.jitter]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        """Inverse of :meth:`to_dict`."""
        return cls([Shape(**s) for s in d["shapes"]], d["word"], tuple(d["word_xy"]), d["background"],
                   [tuple(j) for j in d["jitter"]])


def random_scene(rng: random.Random, *, n_shapes: int | None = None, word: bool | None = None) -> Scene:
    """Draw a scene: 1-4 shapes in distinct slots with distinct (kind, colour) pairs; a word half the time."""
    n = n_shapes if n_shapes is not None else rng.randint(1, 4)
    slots = rng.sample(list(POSITIONS), n)
    pairs = rng.sample([(k, c) for k in SHAPES for c in COLOURS], n)
    shapes = [Shape(k, c, p, rng.randint(10, 13)) for (k, c), p in zip(pairs, slots)]
    jitter = [(rng.randint(-3, 3), rng.randint(-3, 3)) for _ in shapes]
    has_word = (rng.random() < WORD_PROBABILITY) if word is None else word
    w = rng.choice(WORDS) if has_word else None
    xy = (rng.randint(2, 8), rng.randint(2, 8))
    bg = rng.randint(235, 255)
    return Scene(shapes, w, xy, bg, jitter)


_FONT = None


def _font():
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default_imagefont()  # the bitmap font: identical pixels on every machine
    return _FONT


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, jitter: tuple[int, int], size: int, fill) -> None:
    """Draw one shape of a scene on an image of ``size`` pixels with ``fill`` (a colour, or a label value)."""
    s = size / REF_SIZE
    fx, fy = POSITIONS[shape.position]
    cx, cy, h = fx * size + jitter[0] * s, fy * size + jitter[1] * s, shape.half * s
    if shape.kind == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape.kind == "square":
        draw.rectangle([cx - h * 0.9, cy - h * 0.9, cx + h * 0.9, cy + h * 0.9], fill=fill)
    else:
        draw.polygon([(cx, cy - h), (cx - h * 1.1, cy + h * 0.9), (cx + h * 1.1, cy + h * 0.9)], fill=fill)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size`` x ``size`` pixels (no anti-aliasing: exact, portable)."""
    s = size / REF_SIZE
    img = Image.new("RGB", (size, size), (scene.background,) * 3)
    draw = ImageDraw.Draw(img)
    for shape, jitter in zip(scene.shapes, scene.jitter or [(0, 0)] * len(scene.shapes)):
        draw_shape(draw, shape, jitter, size, COLOURS[shape.colour])
    if scene.word:
        # the 11 px bitmap font, drawn at 2x (nearest neighbour) from 128 px images up
        font = _font()
        l, t, r, b = font.getbbox(scene.word)
        mask = Image.new("L", (r, b), 0)
        ImageDraw.Draw(mask).text((0, 0), scene.word, fill=255, font=font)
        scale = max(1, int(2 * s))
        mask = mask.resize((r * scale, b * scale), Image.NEAREST)
        x, y = round(scene.word_xy[0] * s), round(scene.word_xy[1] * s)
        img.paste((20, 20, 20), (x, y, x + mask.width, y + mask.height), mask)
    return img


def questions(scene: Scene, types: tuple[str, ...] = QUESTION_TYPES) -> list[tuple[str, str, str]]:
    """Every unambiguous ``(type, question, answer)`` of a scene among ``types`` (default: the five evaluated
    ones; :data:`EXTRA_QUESTION_TYPES` adds the training aids), answers derived from the spec."""
    out = [("count", "How many shapes are there?", str(len(scene.shapes)))]
    kinds = [s.kind for s in scene.shapes]
    colours = [s.colour for s in scene.shapes]
    for s in scene.shapes:
        if kinds.count(s.kind) == 1:
            out.append(("colour", f"What colour is the {s.kind}?", s.colour))
        out.append(("position", f"Where is the {s.colour} {s.kind}?", s.position))
        if colours.count(s.colour) == 1:
            out.append(("shape", f"What shape is {s.colour}?", s.kind))
    if scene.word:
        out.append(("word", "What word is written?", scene.word))
    for kind in SHAPES:
        out.append(("count_kind", f"How many {kind}s are there?", str(kinds.count(kind))))
    for i, colour in enumerate(COLOURS):  # every present colour, half the absent ones
        if colour in colours or (i + len(colours)) % 2:
            out.append(("count_colour", f"How many {colour} shapes are there?", str(colours.count(colour))))
    # as many absent (colour, kind) pairs as present ones, near misses: one attribute shared with a shape
    present = sorted({(s.colour, s.kind) for s in scene.shapes})
    near = sorted(({(c, s.kind) for s in scene.shapes for c in COLOURS}
                   | {(s.colour, k) for s in scene.shapes for k in SHAPES}) - set(present))
    start = (7 * len(present)) % max(1, len(near))
    for (colour, kind), answer in [(p, "yes") for p in present] + [(p, "no") for p in (near[start:] + near[:start])[:len(present)]]:
        article = "an" if colour[0] in "aeiou" else "a"
        out.append(("exists", f"Is there {article} {colour} {kind}?", answer))
    return [q for q in out if q[0] in types]


def question_for(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """One random ``(question, answer)`` of type ``qtype`` for ``scene``, or None when it has none."""
    options = [(q, a) for t, q, a in questions(scene, (qtype,))]
    return rng.choice(options) if options else None


def normalize_answer(text: str) -> str:
    """What exact match compares: stripped, lower case, without a final full stop."""
    return text.strip().lower().rstrip(".").strip()


def _sample_scene_for(rng: random.Random, qtype: str) -> tuple[Scene, str, str]:
    while True:
        scene = random_scene(rng, word=True if qtype == "word" else None)
        qa = question_for(scene, qtype, rng)
        if qa is not None:
            return scene, *qa


def write_split(out_dir: str | os.PathLike, name: str, n_images: int, seed: int, *,
                max_turns: int = 4, type_weights: dict[str, float] | None = None,
                types: tuple[str, ...] = QUESTION_TYPES) -> Path:
    """Write ``out_dir/name.jsonl`` and ``out_dir/name/*.png``: ``n_images`` scenes, each a conversation of
    1..``max_turns`` question/answer turns (distinct questions, types spread out) of ``types``. ``type_weights`` (question
    type -> weight, default 1 each) makes some types come first more often: the order of a scene's types is
    drawn by weight, without replacement. Returns the JSONL path."""
    rng = random.Random(seed)
    out = Path(out_dir)
    img_dir = out / name
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        scene = random_scene(rng)
        qs = questions(scene, types)
        by_type: dict[str, list] = {}
        for t, q, a in qs:
            by_type.setdefault(t, []).append((q, a))
        kinds = list(by_type)
        if type_weights:
            order = []
            while kinds:
                t = rng.choices(kinds, weights=[type_weights.get(x, 1.0) for x in kinds])[0]
                order.append(t)
                kinds.remove(t)
            kinds = order
        else:
            rng.shuffle(kinds)
        picked = [rng.choice(by_type[t]) for t in kinds]
        turns = picked[:rng.randint(1, min(max_turns, len(picked)))]
        fname = f"{name}/{i:06d}.png"
        render(scene).save(out / fname)
        conv = []
        for j, (q, a) in enumerate(turns):
            conv.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + q})
            conv.append({"from": "gpt", "value": a})
        rows.append({"id": f"{name}-{i}", "image": fname, "conversations": conv, "scene": scene.to_dict()})
    path = out / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def eval_questions(n: int, seed: int) -> list[dict]:
    """``n`` held-out items ``{"type", "question", "answer", "scene", "image"}`` (``image`` a PIL image), the
    question types in turn (colour, count, position, shape, word, colour, ...), one scene per item."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        scene, q, a = _sample_scene_for(rng, qtype)
        items.append({"type": qtype, "question": q, "answer": a, "scene": scene, "image": render(scene)})
    return items


def example_scene() -> Scene:
    """The scene of ``examples/demo.png`` (the README's example): a red circle on the left, a blue square on
    the right, a green triangle at the top and the word ``cat``."""
    return Scene([Shape("circle", "red", "left", 12), Shape("square", "blue", "right", 12),
                  Shape("triangle", "green", "top", 12)], "cat", (5, 5), 255, [(0, 0)] * 3)
