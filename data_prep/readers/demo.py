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
    doc_tokens: int = 0  # > 0: documents sized in estimated tokens, not characters (demo_corpus.py)
    image_tokens: int = 18  # what one image costs in the model's sequence (token mode only)
    retrieval_frac: float = 0.4
    name = "demo"

    def describe(self) -> dict:
        d = {"format": "demo", "documents": self.documents, "seed": self.seed, "max_chars": self.max_chars,
             "image_size": self.image_size}
        # only when set, so a shard directory written before these options existed still resumes
        if self.doc_tokens:
            d.update(doc_tokens=self.doc_tokens, image_tokens=self.image_tokens)
        if self.retrieval_frac != 0.4:
            d["retrieval_frac"] = self.retrieval_frac
        return d

    def plan(self, unit_docs: int) -> list[dict]:
        return [{"start": s, "stop": min(s + unit_docs, self.documents), "n": min(unit_docs, self.documents - s)}
                for s in range(0, self.documents, unit_docs)]

    def read(self, spec: dict) -> Iterator[RawDoc]:
        for i in range(spec["start"], spec["stop"]):
            doc = generate_document(self.seed, i, max_chars=self.max_chars, image_size=self.image_size,
                                    retrieval_frac=self.retrieval_frac, doc_tokens=self.doc_tokens,
                                    image_tokens=self.image_tokens)
            parts = [RawText(s.text, s.role) if s.type == "text" else RawImage(data=doc.images[s.field])
                     for s in doc.segments]
            yield RawDoc(input_id=str(i), source="demo", parts=parts, meta=doc.meta, doc_id=doc.id)
