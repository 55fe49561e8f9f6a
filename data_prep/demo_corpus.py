"""The embedded demo corpus: seeded, interleaved image-text documents drawn with Pillow.

Pictures show one or more shapes of one colour in one region of the frame; the text describes them.
Three kinds of documents:

- `caption`: a few pictures, each with a sentence that describes it (before or after the picture);
- `story`: pictures and facts mixed, as in a long illustrated page;
- `retrieval`: a key item early on (a picture that is never described, or a fact), then a stretch
  of distractor pictures and facts, then a question near the end whose answer (a text segment with
  role "answer") can only be found by attending back to the key item. The key item starts with a
  text segment of role "key" (the fact itself, or "Remember picture X. " right before the picture),
  so an evaluation can measure the distance in tokens; the distance varies, so retrieval can be
  scored per distance bucket, and its length in characters is recorded in `meta`.

Document length: by default in characters of text (`max_chars`). With `doc_tokens` the budget is in
*estimated tokens* instead (text at ~CHARS_PER_TOKEN characters a token, every image
`image_tokens` tokens): stories fill half to all of it, and retrieval questions are placed at
log-uniform distances up to it, so documents as long as a long-context model's rows exist and every
distance bucket up to that length gets questions.

Nothing is downloaded: every picture is drawn here. Document i depends only on (seed, i), so any
subset can be regenerated independently and in parallel.

    msa-prep demo --output /tmp/demo --documents 2000
    msa-prep demo --output /tmp/long --documents 2000 --doc-tokens 16000 --image-tokens 258
"""
from __future__ import annotations

import io
import math
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
# characters per token of the demo's text under its own BPE tokenizer (measured: 4.07 with 2048
# tokens; larger vocabularies pack a little more), used only to size documents given in tokens
CHARS_PER_TOKEN = 4.0
# the budget left unused in token mode: the estimate is not exact, and a document longer than a row
# would be cut (its retrieval question lost to the evaluation)
TOKEN_MARGIN = 0.92


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
    """Collects segments and keeps the document's size in budget units: characters of text by
    default, estimated tokens when `image_units` is given (text chars / CHARS_PER_TOKEN + images)."""

    def __init__(self, doc_id: str, rng: random.Random, image_size: int, image_units: float | None = None):
        self.doc_id, self.rng, self.image_size = doc_id, rng, image_size
        self.segments: list[Segment] = []
        self.images: dict[str, bytes] = {}
        self.chars = 0
        self.tokens_mode = image_units is not None
        self.text_unit = 1.0 / CHARS_PER_TOKEN if self.tokens_mode else 1.0
        self.image_unit = float(image_units or 0.0)
        self.size = 0.0

    def cost(self, text: str) -> float:
        return len(text) * self.text_unit

    def text(self, s: str, role: str = "") -> None:
        # consecutive plain text is merged into one segment
        if self.segments and self.segments[-1].type == "text" and not role and not self.segments[-1].role:
            self.segments[-1].text += s
        else:
            self.segments.append(Segment("text", text=s, role=role))
        self.chars += len(s)
        self.size += len(s) * self.text_unit

    def image(self, pic: Picture) -> None:
        name = f"{len(self.images):04d}.png"
        self.images[name] = draw_picture(pic, self.rng, self.image_size)
        self.segments.append(Segment("image", field=name))
        self.size += self.image_unit

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
        b.text(sentence, role="key")
        question = f"Question: what is the code of the {color} {obj}? Answer:"
    else:
        name = rng.choice([n for n in NAMES if n not in used])
        used.add(name)
        question, answer = _key_picture(b, name, qa_type)
    # distance: uniform over the document budget, so every distance bucket gets questions
    gap = rng.randint(0, max(0, max_chars - b.chars - len(question) - 16))
    key_end = b.chars
    while b.chars - key_end < gap:
        _distractor(b, used, avoid)
    distance = b.chars - start
    b.text(question)
    b.text(" " + answer + ".", role="answer")
    return b.build("retrieval", {"qa_type": qa_type, "answer": answer, "distance_chars": distance})


def _key_picture(b: _DocBuilder, name: str, qa_type: str) -> tuple[str, str]:
    """The key picture of a picture question, marked by its "key" text; returns (question, answer)."""
    pic = random_picture(b.rng)
    # the key picture is never described in words: the answer is only in its pixels
    b.text(f"Remember picture {name}. ", role="key")
    b.image(pic)
    b.text(" ")
    if qa_type == "color":
        return f"Question: what colour are the shapes in picture {name}? Answer:", pic.color
    if qa_type == "count":
        return f"Question: how many shapes are in picture {name}? Answer:", COUNT_WORDS[pic.count - 1]
    return f"Question: which shape is in picture {name}? Answer:", pic.shape


# ---------------------------------------------------------------------------------------------------
# token mode: documents sized in estimated tokens (long-context studies)


def _story_doc_tokens(b: _DocBuilder, budget: float) -> Document:
    target = b.rng.uniform(budget / 2, budget)
    used: set[str] = set()
    while b.size < target:
        _distractor(b, used, ("", ""))
    return b.build("story", {})


def _retrieval_doc_tokens(b: _DocBuilder, budget: float) -> Document:
    """The question's distance from its key item is log-uniform between 16 tokens and the budget, so
    geometric distance buckets (the evaluation's) get about equal shares; a lead-in of distractors
    places the key item at a random position of what the budget leaves."""
    rng = b.rng
    qa_type = rng.choice(("fact", "color", "count", "shape"))
    q_cost = 24.0  # the question and its answer, estimated tokens
    distance = math.exp(rng.uniform(math.log(16), math.log(max(17.0, budget - q_cost - 8))))
    lead = rng.uniform(0, max(0.0, budget - q_cost - distance - 8))
    avoid = ("", "")
    # the asked-for object or picture name is reserved up front: a long lead-in of distractors
    # must neither repeat it nor use up the picture names
    name = rng.choice(NAMES)
    used: set[str] = {name}
    if qa_type == "fact":
        color, obj = rng.choice(list(COLORS)), rng.choice(OBJECTS)
        avoid = (color, obj)
    while b.size < lead:
        _distractor(b, used, avoid)
    start = b.size
    if qa_type == "fact":
        sentence, answer = _fact(rng, color, obj)
        b.text(sentence, role="key")
        question = f"Question: what is the code of the {color} {obj}? Answer:"
    else:
        question, answer = _key_picture(b, name, qa_type)
    while b.size - start < distance:
        _distractor(b, used, avoid)
    est = round(b.size - start)
    b.text(question)
    b.text(" " + answer + ".", role="answer")
    return b.build("retrieval", {"qa_type": qa_type, "answer": answer, "distance_tokens_est": est})


def generate_document(seed: int, index: int, max_chars: int = 3000, image_size: int = DEFAULT_IMAGE_SIZE,
                      retrieval_frac: float = 0.4, doc_tokens: int = 0, image_tokens: int = 18) -> Document:
    """Document `index` of the corpus with this seed (independent of every other index).

    doc_tokens > 0 sizes documents in estimated tokens instead of characters (`max_chars` is then
    unused); `image_tokens` is what one image costs in the model's sequence (begin + patches + end).
    """
    rng = random.Random(f"msa-demo/{seed}/{index}")
    if doc_tokens > 0:
        b = _DocBuilder(f"demo-s{seed}-{index:07d}", rng, image_size, image_units=image_tokens)
    else:
        b = _DocBuilder(f"demo-s{seed}-{index:07d}", rng, image_size)
    u = rng.random()
    if doc_tokens > 0:
        budget = doc_tokens * TOKEN_MARGIN
        if u < retrieval_frac:
            return _retrieval_doc_tokens(b, budget)
        if u < retrieval_frac + (1 - retrieval_frac) / 2:
            return _caption_doc(b)
        return _story_doc_tokens(b, budget)
    if u < retrieval_frac:
        return _retrieval_doc(b, max_chars)
    if u < retrieval_frac + (1 - retrieval_frac) / 2:
        return _caption_doc(b)
    return _story_doc(b, max_chars)


def generate_corpus(seed: int, n_documents: int, **kwargs):
    for i in range(n_documents):
        yield generate_document(seed, i, **kwargs)
