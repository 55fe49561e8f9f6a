"""The two kinds of task a conversion runs, in worker processes or as Ray tasks (both picklable).

`process_unit`: read one work unit, normalize its documents and write them, in input order, to a
spill part `.work/part-NNNNNN.tar` (same tar format as a shard), then its record
`.work/part-NNNNNN.json` (counts, and the hashes and sizes the dedup and the shard cutting need).
The record is written last and atomically: it is what marks the unit done.

`write_shard`: copy the documents the merge assigned to one output shard out of the spill parts,
dropping the duplicate images the dedup decided, into `shard-NNNNNN.tar` (temp name + rename), then
its record `.work/shard-NNNNNN.json`.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from data_prep.normalize import NormalizeConfig, Normalized, normalize_document
from data_prep.reader import iter_samples
from data_prep.readers import Reader
from data_prep.schema import Document, Segment, parse_document, shard_name
from data_prep import shards as shard_io


def part_path(work_dir: Path, index: int) -> Path:
    return Path(work_dir) / f"part-{index:06d}.tar"


def part_record_path(work_dir: Path, index: int) -> Path:
    return Path(work_dir) / f"part-{index:06d}.json"


def shard_record_path(work_dir: Path, index: int) -> Path:
    return Path(work_dir) / f"shard-{index:06d}.json"


def write_json_atomic(path: Path, body: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(body, sort_keys=True, separators=(",", ":")))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _warn(msg: str) -> None:
    print(f"msa-prep: warning: {msg}", file=sys.stderr, flush=True)


def process_unit(reader: Reader, spec: dict, cfg: NormalizeConfig, work_dir: str, index: int,
                 digest: str) -> dict:
    work = Path(work_dir)
    rejected: Counter = Counter()
    images_rejected: Counter = Counter()
    docs: list[dict] = []
    seen = 0

    def normalized_docs():
        nonlocal seen
        it = reader.read(spec)
        while True:
            try:
                raw = next(it)
            except StopIteration:
                return
            except Exception as e:  # the input broke off mid-unit (a corrupt tar or parquet file)
                _warn(f"{reader.name} unit {index}: reading stopped after {seen} documents: "
                      f"{type(e).__name__}: {e}")
                return
            seen += 1
            try:
                res = normalize_document(raw, cfg)
            except Exception:
                _warn(f"{raw.input_id}: processing_error:\n{traceback.format_exc(limit=4)}")
                res = Normalized(raw.input_id, reason="processing_error")
            images_rejected.update(res.images_rejected)
            if res.doc is None:
                rejected[res.reason] += 1
                continue
            sample = res.doc.to_sample()
            docs.append({
                "id": res.doc.id, "input_id": raw.input_id, "sha256": res.doc_sha256,
                "images": res.image_sha256, "require_image": res.require_image,
                "json_bytes": len(sample["json"]), "image_bytes": [len(res.doc.images[s.field])
                                                                    for s in res.doc.segments if s.type == "image"],
            })
            yield res.doc

    shard_io.write_shard(part_path(work, index), normalized_docs())
    if seen < spec["n"]:  # every planned input is accounted for, also those a broken file swallowed
        rejected["bad_file"] += spec["n"] - seen
    record = {"index": index, "digest": digest, "inputs": max(seen, spec["n"]), "rejected": dict(rejected),
              "images_rejected": dict(images_rejected), "docs": docs,
              "documents": len(docs), "images": sum(len(d["image_bytes"]) for d in docs)}
    write_json_atomic(part_record_path(work, index), record)
    return record


def drop_images(doc: Document, drop: list[int]) -> Document:
    """The document without the images at those positions; image fields renumbered in order."""
    segments, images, provenance = [], {}, []
    old_meta = doc.meta.get("images")
    k = 0
    for seg in doc.segments:
        if seg.type != "image":
            segments.append(seg)
            continue
        if k not in drop:
            name = f"{len(images):04d}.{seg.field.rsplit('.', 1)[1]}"
            images[name] = doc.images[seg.field]
            segments.append(Segment("image", field=name, role=seg.role))
            if isinstance(old_meta, list) and k < len(old_meta):
                provenance.append(old_meta[k])
        k += 1
    # text runs that the dropped image separated become one segment again, as the normalizer makes them
    merged: list[Segment] = []
    for seg in segments:
        if merged and seg.type == "text" and merged[-1].type == "text" and merged[-1].role == seg.role:
            merged[-1] = Segment("text", text=merged[-1].text + seg.text, role=seg.role)
        else:
            merged.append(seg)
    meta = dict(doc.meta)
    if isinstance(old_meta, list):
        meta["images"] = provenance
    return Document(doc.id, doc.source, merged, images, meta)


def write_shard(work_dir: str, out_dir: str, index: int, entries: list[list], digest: str) -> dict:
    """entries: [unit, doc id, doc sha256, images to drop], in shard order."""
    work, out = Path(work_dir), Path(out_dir)
    by_unit: dict[int, dict[str, list[int]]] = {}
    for unit, doc_id, _, drop in entries:
        by_unit.setdefault(unit, {})[doc_id] = drop

    def docs():
        for unit, wanted in by_unit.items():
            for key, members in iter_samples(part_path(work, unit)):
                if key not in wanted:
                    continue
                drop = wanted.pop(key)
                doc = parse_document(members["json"], {s: b for s, b in members.items() if s != "json"})
                yield drop_images(doc, drop) if drop else doc
                if not wanted:
                    break
            if wanted:
                raise RuntimeError(f"{part_path(work, unit)} lacks documents {sorted(wanted)[:3]}")

    info = shard_io.write_shard(out / shard_name(index), docs())
    body = {"index": index, "digest": digest, "info": asdict(info)}
    write_json_atomic(shard_record_path(work, index), body)
    return body
