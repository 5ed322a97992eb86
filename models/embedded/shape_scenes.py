"""The tiny-vlm model's synthetic data: drawn scenes of shapes and short words, with questions about them.

A scene is up to four items, one per quadrant of a 48 x 48 white image: coloured
shapes (circle, square, triangle) and at most one short word rendered in black with
Pillow's default font. Sizes and offsets are jittered, so no two scenes draw alike.
Every question has one right answer read off the scene: counts, colours, shapes,
positions, yes / no, the word, and a description of the whole scene.

The split is a property of the scene itself (a hash of its description,
``is_held_out``), not of the random stream that drew it: a held-out scene, and so
its image and every question about it, can never be drawn for training, whatever
seed or count a build uses. ``scenes(n, seed, split)`` keeps the scenes of one split
from a seeded stream. The build (``benchmarks/train_tiny_vlm.py``) trains on
``scenes(n, seed, "train")`` and ships the held-out scenes it is measured on
(``models/assets/tiny-vlm/held_out.jsonl.gz``); ``tests/test_vlm_tiny.py`` asserts
they are disjoint on the shipped file.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import json
from functools import lru_cache
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 48
HALF = IMAGE_SIZE // 2
COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (235, 200, 20),
          "purple": (150, 60, 190), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "sun", "box", "hat", "map", "pen", "cup")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
HELD_OUT_EVERY = 8  # one scene in 8, by its hash, is held out
HELD_OUT_FILE = "held_out.jsonl.gz"  # in the shipped model's directory (``write_held_out``)
IMAGE_TOKEN, EOS, PAD, UNK = "<image>", "<eos>", "<pad>", "<unk>"


@dataclasses.dataclass(frozen=True)
class Item:
    """One object: a shape (``color`` set) or a word (``word`` set), in quadrant ``quadrant``."""

    quadrant: int  # index into QUADRANTS
    shape: str = ""  # one of SHAPES, or "" for a word
    color: str = ""
    word: str = ""
    size: int = 12  # a shape's side / diameter in pixels
    dx: int = 0  # offset of the item's centre from the quadrant's centre
    dy: int = 0


@dataclasses.dataclass(frozen=True)
class Scene:
    items: tuple[Item, ...]  # sorted by quadrant

    def key(self) -> str:
        """A canonical description: equal scenes (and only they) draw the same image."""
        return json.dumps([dataclasses.astuple(item) for item in self.items], separators=(",", ":"))

    @property
    def shapes(self) -> list[Item]:
        return [item for item in self.items if item.shape]

    @property
    def word(self) -> Item | None:
        return next((item for item in self.items if item.word), None)


def is_held_out(scene: Scene) -> bool:
    """Whether a scene belongs to the held-out split: a property of the scene, so no stream can leak it."""
    digest = hashlib.sha256(scene.key().encode()).digest()
    return int.from_bytes(digest[:4], "little") % HELD_OUT_EVERY == 0


def random_scene(rng: np.random.Generator) -> Scene:
    """One to four items in distinct quadrants; at least one shape, a word in about a third of the scenes."""
    n = int(rng.integers(1, 5))
    quadrants = sorted(int(q) for q in rng.choice(4, n, replace=False))
    word_at = quadrants[int(rng.integers(n))] if n > 1 and rng.random() < 0.4 else -1
    items = []
    for q in quadrants:
        dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
        if q == word_at:
            items.append(Item(quadrant=q, word=WORDS[int(rng.integers(len(WORDS)))], dx=dx, dy=dy))
        else:
            items.append(Item(quadrant=q, shape=SHAPES[int(rng.integers(len(SHAPES)))],
                              color=list(COLORS)[int(rng.integers(len(COLORS)))], size=int(rng.integers(11, 17)),
                              dx=dx, dy=dy))
    return Scene(tuple(items))


def scenes(n: int, seed: int, split: str) -> list[Scene]:
    """The first ``n`` distinct scenes of ``split`` ("train" or "held_out") in the stream of ``seed``."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    rng = np.random.default_rng([seed, 0x5CE7E])
    out: dict[str, Scene] = {}
    while len(out) < n:
        scene = random_scene(rng)
        if is_held_out(scene) == (split == "held_out"):
            out.setdefault(scene.key(), scene)
    return list(out.values())


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def draw(scene: Scene) -> np.ndarray:
    """The scene as uint8 [48, 48, 3]: shapes filled in their colour, the word in black, on white."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    for item in scene.items:
        cx = (item.quadrant % 2) * HALF + HALF // 2 + item.dx
        cy = (item.quadrant // 2) * HALF + HALF // 2 + item.dy
        if item.word:
            pen.text((cx, cy), item.word.upper(), fill=(0, 0, 0), font=_font(), anchor="mm")
            continue
        r, color = item.size / 2, COLORS[item.color]
        box = (cx - r, cy - r, cx + r, cy + r)
        if item.shape == "circle":
            pen.ellipse(box, fill=color)
        elif item.shape == "square":
            pen.rectangle(box, fill=color)
        else:
            pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)
    return np.asarray(image)


def questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(question, answer) pairs with exactly one right answer, every kind that applies to the scene.

    ``rng`` picks the absent colours and shapes that yes / no and count questions also ask about.
    """
    shapes, word = scene.shapes, scene.word
    count = lambda pred: NUMBERS[sum(1 for s in shapes if pred(s))]
    qa = [("how many shapes are there ?", NUMBERS[len(shapes)])]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    qa.append((f"how many {color} shapes are there ?", count(lambda s: s.color == color)))
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    qa.append((f"how many {kind}s are there ?", count(lambda s: s.shape == kind)))
    for s in shapes:
        if sum(t.shape == s.shape for t in shapes) == 1:
            qa.append((f"what color is the {s.shape} ?", s.color))
        if sum((t.shape, t.color) == (s.shape, s.color) for t in shapes) == 1:
            qa.append((f"where is the {s.color} {s.shape} ?", QUADRANTS[s.quadrant]))
    by_quadrant = {item.quadrant: item for item in scene.items}
    for q, name in enumerate(QUADRANTS):
        item = by_quadrant.get(q)
        qa.append((f"what is at the {name} ?",
                   "nothing" if item is None else "a word" if item.word else f"{item.color} {item.shape}"))
    asked = (color, kind)
    qa.append((f"is there a {asked[0]} {asked[1]} ?",
               "yes" if any((s.color, s.shape) == asked for s in shapes) else "no"))
    if word is not None:
        qa.append(("what does the word say ?", word.word))
        qa.append(("where is the word ?", QUADRANTS[word.quadrant]))
    qa.append((DESCRIBE, describe(scene)))
    return qa


DESCRIBE = "describe the picture ?"


def describe(scene: Scene) -> str:
    """Every item in quadrant order, ``red circle at top left and word cat at bottom right``: the one
    long answer (up to 23 words), so decoding it takes many steps, each read off the image."""
    return " and ".join(f"word {item.word} at {QUADRANTS[item.quadrant]}" if item.word
                        else f"{item.color} {item.shape} at {QUADRANTS[item.quadrant]}" for item in scene.items)


def question_kind(question: str) -> str:
    """The template a question came from (for per-kind accuracy)."""
    for prefix, kind in (("describe", "describe"), ("how many shapes", "count"), ("how many", "count of a kind"),
                         ("what color", "color"), ("where is the word", "where (word)"), ("where", "where"),
                         ("what is at", "what is at"), ("is there", "yes / no"), ("what does", "read the word")):
        if question.startswith(prefix):
            return kind
    raise ValueError(f"not a template question: {question!r}")


@dataclasses.dataclass(frozen=True)
class Sample:
    scene: Scene
    question: str
    answer: str


def samples(scene_list: list[Scene], seed: int) -> list[Sample]:
    """Every question of every scene (``questions``, its absent colours drawn from ``seed``)."""
    rng = np.random.default_rng([seed, 0x9A])
    return [Sample(s, q, a) for s in scene_list for q, a in questions(s, rng)]


def prompt_text(question: str) -> str:
    """The text of a prompt: the image placeholder, then the question; the answer follows it."""
    return f"{IMAGE_TOKEN} {question}"


TEMPLATE_WORDS = ("how many shapes are there ? what color is the where at a does word say nothing yes no "
                  "describe picture and").split()


def vocabulary() -> list[str]:
    """Every word a prompt or answer can hold, specials first (the word-level tokenizer's vocabulary)."""
    words = set(TEMPLATE_WORDS) | set(COLORS) | set(SHAPES) | {f"{s}s" for s in SHAPES} | set(WORDS)
    words |= set(NUMBERS) | {w for name in QUADRANTS for w in name.split()}
    return [PAD, EOS, IMAGE_TOKEN, UNK] + sorted(words)


# ------------------------------------------------------------------ the shipped held-out file


def png_base64(pixels: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", optimize=True)
    return base64.b64encode(out.getvalue()).decode()


def write_held_out(path: str, scene_list: list[Scene], seed: int) -> None:
    """One JSON line per scene: its description, its image as PNG (base64), its questions and answers."""
    rng = np.random.default_rng([seed, 0x9A])
    with gzip.open(path, "wt", compresslevel=9) as f:
        for scene in scene_list:
            f.write(json.dumps({"scene": scene.key(), "png": png_base64(draw(scene)),
                                "qa": questions(scene, rng)}) + "\n")


def read_held_out(path: str) -> Iterator[tuple[Scene, np.ndarray, list[tuple[str, str]]]]:
    """The shipped held-out scenes: (scene, uint8 image [48, 48, 3] decoded from the file, (question, answer)s)."""
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            scene = Scene(tuple(Item(*fields) for fields in json.loads(row["scene"])))
            image = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["png"]))).convert("RGB"))
            yield scene, image, [tuple(pair) for pair in row["qa"]]
