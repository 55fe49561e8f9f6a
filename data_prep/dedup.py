"""Exact deduplication, decided once, in input order: the first occurrence wins.

The work units hash what they normalize (sha256 of each normalized image's bytes; sha256 of the
document's canonical content: texts, roles and image hashes, see `normalize.document_hash`) and write
the hashes into their records. This module reads the records in unit order, which is input order, and
decides:

1. a document whose content hash was seen before is rejected (`duplicate_document`);
2. in the documents that remain, an image whose hash was seen before (in an earlier kept document, or
   earlier in the same one) is dropped (`images_rejected["duplicate_image"]`); a document that needs
   its image (a pair) and loses it is rejected under `duplicate_image`.

Documents are deduplicated before images: a copy of a whole document must be caught as a copy, not
turned into a text-only document by losing its (duplicate) images first. The decision depends only on
the records in their fixed order, never on which worker finished first, so parallel and sequential
runs agree. Cost: one pass over the records, which the driver holds in memory (about 2 KB per
document of 8 images), and two sets of 16-byte digest prefixes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class KeptDoc:
    unit: int
    id: str
    sha256: str
    drop: list[int]  # indices (in document order) of the images to drop
    est_bytes: int   # what it adds to a shard, for cutting shards at the target size
    images: int


@dataclass
class Decision:
    kept: list[KeptDoc] = field(default_factory=list)  # in input order
    rejected: Counter = field(default_factory=Counter)
    images_rejected: Counter = field(default_factory=Counter)


def decide(records: list[dict], dedup_documents: bool = True, dedup_images: bool = True) -> Decision:
    """records: the unit records, in unit order (see `units.process_unit`)."""
    out = Decision()
    seen_docs: set[bytes] = set()
    seen_images: set[bytes] = set()
    for rec in records:
        for d in rec["docs"]:
            key = bytes.fromhex(d["sha256"])[:16]
            if dedup_documents and key in seen_docs:
                out.rejected["duplicate_document"] += 1
                continue
            drop, new = [], []
            for i, sha in enumerate(d["images"]):
                k = bytes.fromhex(sha)[:16]
                if dedup_images and (k in seen_images or k in new):
                    drop.append(i)
                else:
                    new.append(k)
            out.images_rejected["duplicate_image"] += len(drop)
            if d["require_image"] and not new:
                out.rejected["duplicate_image"] += 1
                continue
            seen_docs.add(key)
            seen_images.update(new)
            kept_bytes = [b for i, b in enumerate(d["image_bytes"]) if i not in drop]
            est = d["json_bytes"] + sum(kept_bytes) + 512 * (1 + len(kept_bytes))
            out.kept.append(KeptDoc(rec["index"], d["id"], d["sha256"], drop, est, len(kept_bytes)))
    if not out.images_rejected["duplicate_image"]:
        del out.images_rejected["duplicate_image"]
    return out


def cut_shards(kept: list[KeptDoc], max_docs: int, target_bytes: int) -> list[list[KeptDoc]]:
    """Consecutive documents into shards of at most `max_docs` documents and about `target_bytes`."""
    shards: list[list[KeptDoc]] = []
    size = 0
    for doc in kept:
        if not shards or (shards[-1] and (size + doc.est_bytes > target_bytes or len(shards[-1]) >= max_docs)):
            shards.append([])
            size = 0
        shards[-1].append(doc)
        size += doc.est_bytes
    return shards
