"""The embedded demo corpus: seeded, interleaved image-text documents drawn with Pillow.

Pictures show one or more shapes of one colour in one region of the frame; the text describes them.
Three kinds of documents:

- `caption`: a few pictures, each with a sentence that describes it (before or after the picture);
- `story`: pictures and facts mixed, as in a long illustrated page;
- `retrieval`: a key item early on (a picture that is never described, or a fact), then a stretch
  of distractor pictures and facts, then a question near the end whose answer (a text segment with
  role "answer") can only be found by attending back to the key item. The distance between the two
  varies, so retrieval can be scored per distance bucket, and is recorded in `meta`.

Nothing is downloaded: every picture is drawn here. Document i depends only on (seed, i), so any
subset can be regenerated independently and in parallel.

    msa-prep demo --output /tmp/demo --documents 2000
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from data_prep.schema import Document, Segment

COLORS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 119, 220),
    "yellow": (236, 200, 30),
    "purple": (148, 80, 189),
    "orange": (255, 127, 14),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three", "four")
REGIONS = ("left", "right", "top", "bottom")
REGION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
NAMES = ("A", "B", "C", "D", "E", "F", "G", "H", "K", "L", "M", "N", "P", "R", "S", "T")
OBJECTS = ("box", "door", "jar", "gate", "chest", "lamp", "boat", "key")

DEFAULT_IMAGE_SIZE = 64


@dataclass(frozen=True)
class Picture:
    color: str
    shape: str
    count: int  # 1..4
    region: str

    def caption(self, rng: random.Random) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        what = f"{COUNT_WORDS[self.count - 1]} {self.color} {noun} {REGION_PHRASE[self.region]}"
        return rng.choice(
            (
                f"It shows {what}.",
                f"The picture has {what}.",
                f"We can see {what}.",
                f"There {'is' if self.count == 1 else 'are'} {what}.",
            )
        )


def random_picture(rng: random.Random) -> Picture:
    return Picture(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.randint(1, 4), rng.choice(REGIONS))


def draw_picture(pic: Picture, rng: random.Random, size: int = DEFAULT_IMAGE_SIZE) -> bytes:
    """Render a picture as PNG bytes: `count` shapes in the picture's half of the frame."""
    shade = rng.randint(225, 250)
    img = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    half = size // 2
    x0, y0, w, h = {
        "left": (0, 0, half, size),
        "right": (half, 0, half, size),
        "top": (0, 0, size, half),
        "bottom": (0, half, size, half),
    }[pic.region]
    # a 2x2 grid of cells inside the region; each shape takes one cell, jittered
    cells = [(cx, cy) for cy in range(2) for cx in range(2)]
    rng.shuffle(cells)
    cw, ch = w // 2, h // 2
    r = max(3, min(cw, ch) * 3 // 8)
    fill = COLORS[pic.color]
    for cx, cy in cells[: pic.count]:
        mx = x0 + cx * cw + cw // 2 + rng.randint(-1, 1)
        my = y0 + cy * ch + ch // 2 + rng.randint(-1, 1)
        if pic.shape == "circle":
            draw.ellipse((mx - r, my - r, mx + r, my + r), fill=fill)
        elif pic.shape == "square":
            draw.rectangle((mx - r, my - r, mx + r, my + r), fill=fill)
        else:
            draw.polygon(((mx, my - r), (mx - r, my + r), (mx + r, my + r)), fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class _DocBuilder:
    def __init__(self, doc_id: str, rng: random.Random, image_size: int):
        self.doc_id, self.rng, self.image_size = doc_id, rng, image_size
        self.segments: list[Segment] = []
        self.images: dict[str, bytes] = {}
        self.chars = 0

    def text(self, s: str, role: str = "") -> None:
        # consecutive plain text is merged into one segment
        if self.segments and self.segments[-1].type == "text" and not role and not self.segments[-1].role:
            self.segments[-1].text += s
        else:
            self.segments.append(Segment("text", text=s, role=role))
        self.chars += len(s)

    def image(self, pic: Picture) -> None:
        name = f"{len(self.images):04d}.png"
        self.images[name] = draw_picture(pic, self.rng, self.image_size)
        self.segments.append(Segment("image", field=name))

    def build(self, kind: str, meta: dict) -> Document:
        return Document(self.doc_id, "demo", self.segments, self.images, {"kind": kind, **meta})


def _fact(rng: random.Random, color: str, obj: str) -> tuple[str, str]:
    code = str(rng.randint(100, 999))
    return f"The code of the {color} {obj} is {code}. ", code


def _distractor(b: _DocBuilder, used_names: set[str], avoid: tuple[str, str]) -> None:
    """A described picture or a fact that does not answer the question."""
    rng = b.rng
    if rng.random() < 0.55:
        pic = random_picture(rng)
        free = [n for n in NAMES if n not in used_names]
        if free and rng.random() < 0.5:
            name = rng.choice(free)
            used_names.add(name)
            b.text(f"Picture {name}: ")
        else:
            b.text(rng.choice(("Next, another picture. ", "Here is a picture. ", "Look at this. ")))
        b.image(pic)
        b.text(" " + pic.caption(rng) + " ")
    else:
        color, obj = rng.choice(list(COLORS)), rng.choice(OBJECTS)
        if (color, obj) == avoid:
            color = next(c for c in COLORS if c != color)
        b.text(_fact(rng, color, obj)[0])


def _caption_doc(b: _DocBuilder) -> Document:
    rng = b.rng
    for _ in range(rng.randint(1, 4)):
        pic = random_picture(rng)
        if rng.random() < 0.5:
            b.image(pic)
            b.text(" " + pic.caption(rng) + " ")
        else:
            b.text(pic.caption(rng).replace("It shows", "This picture shows") + " ")
            b.image(pic)
            b.text(" ")
    return b.build("caption", {})


def _story_doc(b: _DocBuilder, max_chars: int) -> Document:
    rng = b.rng
    target = rng.randint(max_chars // 4, max_chars // 2)
    used: set[str] = set()
    while b.chars < target:
        _distractor(b, used, ("", ""))
    return b.build("story", {})


def _retrieval_doc(b: _DocBuilder, max_chars: int) -> Document:
    rng = b.rng
    qa_type = rng.choice(("fact", "color", "count", "shape"))
    used: set[str] = set()
    avoid = ("", "")
    # a short lead-in so the key item is not always at position 0
    for _ in range(rng.randint(0, 2)):
        _distractor(b, used, avoid)
    start = b.chars
    if qa_type == "fact":
        color, obj = rng.choice(list(COLORS)), rng.choice(OBJECTS)
        avoid = (color, obj)
        sentence, answer = _fact(rng, color, obj)
        b.text(sentence)
        question = f"Question: what is the code of the {color} {obj}? Answer:"
    else:
        name = rng.choice([n for n in NAMES if n not in used])
        used.add(name)
        pic = random_picture(rng)
        # the key picture is never described in words: the answer is only in its pixels
        b.text(f"Remember picture {name}. ")
        b.image(pic)
        b.text(" ")
        if qa_type == "color":
            question, answer = f"Question: what colour are the shapes in picture {name}? Answer:", pic.color
        elif qa_type == "count":
            question, answer = f"Question: how many shapes are in picture {name}? Answer:", COUNT_WORDS[pic.count - 1]
        else:
            question, answer = f"Question: which shape is in picture {name}? Answer:", pic.shape
    # distance: uniform over the document budget, so every distance bucket gets questions
    gap = rng.randint(0, max(0, max_chars - b.chars - len(question) - 16))
    key_end = b.chars
    while b.chars - key_end < gap:
        _distractor(b, used, avoid)
    distance = b.chars - start
    b.text(question)
    b.text(" " + answer + ".", role="answer")
    return b.build("retrieval", {"qa_type": qa_type, "answer": answer, "distance_chars": distance})


def generate_document(seed: int, index: int, max_chars: int = 3000, image_size: int = DEFAULT_IMAGE_SIZE,
                      retrieval_frac: float = 0.4) -> Document:
    """Document `index` of the corpus with this seed (independent of every other index)."""
    rng = random.Random(f"msa-demo/{seed}/{index}")
    b = _DocBuilder(f"demo-s{seed}-{index:07d}", rng, image_size)
    u = rng.random()
    if u < retrieval_frac:
        return _retrieval_doc(b, max_chars)
    if u < retrieval_frac + (1 - retrieval_frac) / 2:
        return _caption_doc(b)
    return _story_doc(b, max_chars)


def generate_corpus(seed: int, n_documents: int, **kwargs):
    for i in range(n_documents):
        yield generate_document(seed, i, **kwargs)
