"""The embedded demo corpus as a reader: document i depends only on (seed, i), so units are index ranges.

    msa-prep demo --output /tmp/demo --documents 2000
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from data_prep.demo_corpus import generate_document
from data_prep.raw import RawDoc, RawImage, RawText
from data_prep.readers import Reader


@dataclass
class DemoReader(Reader):
    documents: int
    seed: int = 0
    max_chars: int = 3000
    image_size: int = 64
    name = "demo"

    def describe(self) -> dict:
        return {"format": "demo", "documents": self.documents, "seed": self.seed, "max_chars": self.max_chars,
                "image_size": self.image_size}

    def plan(self, unit_docs: int) -> list[dict]:
        return [{"start": s, "stop": min(s + unit_docs, self.documents), "n": min(unit_docs, self.documents - s)}
                for s in range(0, self.documents, unit_docs)]

    def read(self, spec: dict) -> Iterator[RawDoc]:
        for i in range(spec["start"], spec["stop"]):
            doc = generate_document(self.seed, i, max_chars=self.max_chars, image_size=self.image_size)
            parts = [RawText(s.text, s.role) if s.type == "text" else RawImage(data=doc.images[s.field])
                     for s in doc.segments]
            yield RawDoc(input_id=str(i), source="demo", parts=parts, meta=doc.meta, doc_id=doc.id)
