"""The interleaved-document shard format, version 1 (written down in data_prep/README.md).

One WebDataset sample = one document:

    <key>.json        UTF-8 JSON, the document: {"format_version": 1, "id", "source",
                      "segments": [{"type": "text", "text": ...} | {"type": "image", "field": ...}],
                      "meta": {...}}
    <key>.<NNNN>.png  the images, one member each, named by the `field` of their segment
    <key>.<NNNN>.jpg  (PNG or JPEG; already validated and normalized by msa-prep)

Keys contain no dots (WebDataset splits a member name at its first dot). This module is the one place
both `data_prep` (writer) and `pipeline` (reader) take the format from.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1

# Special tokens of the tokenizer. The model's image tokens are: IMG_BEGIN, then one IMG_PATCH per
# patch (the patch encoder's output replaces the placeholder's embedding), then IMG_END.
PAD = "<|pad|>"
DOC = "<|doc|>"  # starts every document; also separates packed documents
IMG_BEGIN = "<|img_begin|>"
IMG_END = "<|img_end|>"
IMG_PATCH = "<|img_patch|>"
SPECIAL_TOKENS = (PAD, DOC, IMG_BEGIN, IMG_END, IMG_PATCH)

KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
IMAGE_FIELD_RE = re.compile(r"^[0-9]{4}\.(png|jpg)$")

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"


class SchemaError(ValueError):
    """A document or sample that does not follow the shard format."""


@dataclass
class Segment:
    """A text run or an image reference, in document order.

    `role` marks spans with a meaning beyond plain text: "answer" is the scored answer of a retrieval
    question (the evaluation measures whether the model predicts it).
    """

    type: str  # "text" | "image"
    text: str = ""
    field: str = ""  # the image's member name, e.g. "0000.png"
    role: str = ""

    def to_json(self) -> dict[str, Any]:
        if self.type == "text":
            out: dict[str, Any] = {"type": "text", "text": self.text}
        else:
            out = {"type": "image", "field": self.field}
        if self.role:
            out["role"] = self.role
        return out


@dataclass
class Document:
    id: str
    source: str
    segments: list[Segment]
    images: dict[str, bytes] = field(default_factory=dict)  # field -> encoded image bytes
    meta: dict[str, Any] = field(default_factory=dict)

    def to_sample(self) -> dict[str, bytes]:
        """The WebDataset members of this document: {suffix: bytes}, the JSON first."""
        validate_document(self)
        body = {
            "format_version": FORMAT_VERSION,
            "id": self.id,
            "source": self.source,
            "segments": [s.to_json() for s in self.segments],
            "meta": self.meta,
        }
        sample = {"json": json.dumps(body, ensure_ascii=False, sort_keys=True).encode("utf-8")}
        for name in sorted(self.images):
            sample[name] = self.images[name]
        return sample

    @property
    def n_images(self) -> int:
        return sum(1 for s in self.segments if s.type == "image")


def validate_document(doc: Document) -> None:
    if not KEY_RE.match(doc.id):
        raise SchemaError(f"document id {doc.id!r} must match {KEY_RE.pattern} (no dots)")
    fields = []
    for i, seg in enumerate(doc.segments):
        if seg.type == "text":
            if not isinstance(seg.text, str):
                raise SchemaError(f"{doc.id}: segment {i} text is not a string")
        elif seg.type == "image":
            if not IMAGE_FIELD_RE.match(seg.field):
                raise SchemaError(f"{doc.id}: segment {i} image field {seg.field!r} is not NNNN.png|jpg")
            if seg.field not in doc.images:
                raise SchemaError(f"{doc.id}: segment {i} refers to missing image {seg.field!r}")
            fields.append(seg.field)
        else:
            raise SchemaError(f"{doc.id}: segment {i} has unknown type {seg.type!r}")
    if len(set(fields)) != len(fields):
        raise SchemaError(f"{doc.id}: an image field is referenced twice")
    if set(fields) != set(doc.images):
        raise SchemaError(f"{doc.id}: images not referenced by any segment: {set(doc.images) - set(fields)}")


def parse_document(doc_json: bytes | str, images: dict[str, bytes]) -> Document:
    """Parse one sample's JSON and its image members back into a Document (a reader's view).

    Raises SchemaError with the reason when the sample does not follow the format.
    """
    try:
        body = json.loads(doc_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(f"document JSON does not parse: {e}") from None
    if not isinstance(body, dict):
        raise SchemaError("document JSON is not an object")
    version = body.get("format_version")
    if version != FORMAT_VERSION:
        raise SchemaError(f"format_version {version!r} is not supported (this reader knows {FORMAT_VERSION})")
    try:
        segments = [
            Segment(type=s["type"], text=s.get("text", ""), field=s.get("field", ""), role=s.get("role", ""))
            for s in body["segments"]
        ]
        doc = Document(
            id=body["id"], source=body.get("source", ""), segments=segments, images=dict(images),
            meta=body.get("meta", {}),
        )
    except (KeyError, TypeError) as e:
        raise SchemaError(f"document JSON lacks a field: {e}") from None
    validate_document(doc)
    return doc


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"
