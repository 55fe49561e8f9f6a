"""OBELICS-style records: parquet or JSONL, one interleaved document per record.

    msa-prep obelics FILE_OR_DIR --image-root DIR --output OUT_DIR

A record has parallel lists `texts` and `images` of equal length; at each position exactly one of the
two is non-null. A text is a string (parquet: string or UTF-8 binary). An image is a path relative to
the image root (default: the input directory, or the input file's directory), a `data:` URI, bytes
(parquet binary), or an object `{"bytes": ..., "path": ...}` (the Hugging Face image struct; in JSONL
the bytes are base64). URLs are never fetched (`remote_image`). Consecutive texts are joined with a
blank line. `url` (or `general_metadata.url`) and `id` are kept in meta. Files are read in sorted
order, records in file order; units are row ranges that never cross a file. Blank JSONL lines are not
records.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from data_prep.raw import RawDoc, RawImage, RawText, image_from_data_uri
from data_prep.readers import MAX_TEXT_FILE_BYTES, Reader
from data_prep.safepath import read_bounded, real_root, resolve_reference

SUFFIXES = (".parquet", ".jsonl")


class BadRecord(Exception):
    pass


@dataclass
class ObelicsReader(Reader):
    input_path: str
    image_root: str | None = None
    name = "obelics"

    @property
    def _base(self) -> str:
        p = real_root(self.input_path)
        return p if os.path.isdir(p) else os.path.dirname(p)

    @property
    def _image_root(self) -> str:
        return real_root(self.image_root) if self.image_root else self._base

    def describe(self) -> dict:
        return {"format": "obelics", "input": real_root(self.input_path), "image_root": self._image_root}

    def _files(self) -> list[str]:
        p = real_root(self.input_path)
        if not os.path.isdir(p):
            return [os.path.basename(p)]
        found = []
        for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
            dirnames.sort()
            found += [os.path.relpath(os.path.join(dirpath, f), p).replace(os.sep, "/")
                      for f in filenames if f.lower().endswith(SUFFIXES)]
        return sorted(found)

    def plan(self, unit_docs: int) -> list[dict]:
        units: list[dict] = []
        for rel in self._files():
            path = os.path.join(self._base, rel)
            try:
                st = os.stat(path)
            except OSError:
                units.append({"file": rel, "kind": "bad", "reason": "bad_file", "n": 1})
                continue
            stamp = [st.st_size, st.st_mtime_ns]
            if st.st_size == 0:
                units.append({"file": rel, "kind": "bad", "reason": "empty_file", "n": 1, "stat": stamp})
            elif rel.lower().endswith(".parquet"):
                units += self._plan_parquet(rel, path, unit_docs, stamp)
            else:
                units += self._plan_jsonl(rel, path, unit_docs, stamp)
        return units

    def _plan_parquet(self, rel, path, unit_docs, stamp) -> list[dict]:
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception:  # not parquet, or a broken footer
            return [{"file": rel, "kind": "bad", "reason": "bad_file", "n": 1, "stat": stamp}]
        return [{"file": rel, "kind": "parquet", "start": s, "stop": min(s + unit_docs, rows),
                 "n": min(unit_docs, rows - s), "stat": stamp} for s in range(0, rows, unit_docs)]

    def _plan_jsonl(self, rel, path, unit_docs, stamp) -> list[dict]:
        units, row, offset = [], 0, 0
        try:
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        if row % unit_docs == 0:
                            units.append({"file": rel, "kind": "jsonl", "offset": offset, "first_row": row,
                                          "n": 0, "stat": stamp})
                        units[-1]["n"] += 1
                        row += 1
                    offset += len(line)
        except OSError:
            return [{"file": rel, "kind": "bad", "reason": "bad_file", "n": 1, "stat": stamp}]
        return units

    def read(self, spec: dict) -> Iterator[RawDoc]:
        rel = spec["file"]
        if spec["kind"] == "bad":
            yield RawDoc(input_id=rel, source="obelics", error=spec["reason"], meta={"source_path": rel})
        elif spec["kind"] == "parquet":
            yield from self._read_parquet(spec)
        else:
            yield from self._read_jsonl(spec)

    def _read_parquet(self, spec: dict) -> Iterator[RawDoc]:
        import pyarrow.parquet as pq

        rel, start, stop = spec["file"], spec["start"], spec["stop"]
        pf = pq.ParquetFile(os.path.join(self._base, rel))
        row0 = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            lo, hi = max(start, row0), min(stop, row0 + n)
            if lo < hi:
                table = pf.read_row_group(g).slice(lo - row0, hi - lo)
                for i, rec in enumerate(table.to_pylist()):
                    yield self._doc(rec, rel, lo + i)
            row0 += n
            if row0 >= stop:
                break

    def _read_jsonl(self, spec: dict) -> Iterator[RawDoc]:
        rel = spec["file"]
        with open(os.path.join(self._base, rel), "rb") as f:
            f.seek(spec["offset"])
            row = spec["first_row"]
            while row < spec["first_row"] + spec["n"]:
                line = f.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                doc = RawDoc(input_id=f"{rel}:{row}", source="obelics", meta={"source_path": rel, "row": row})
                if len(line) > MAX_TEXT_FILE_BYTES:
                    doc.error = "file_too_large"
                else:
                    try:
                        rec = json.loads(line.decode("utf-8"))
                    except UnicodeDecodeError:
                        doc.error = "bad_encoding"
                    except json.JSONDecodeError:
                        doc.error = "bad_record"
                    else:
                        doc = self._doc(rec, rel, row)
                yield doc
                row += 1

    def _doc(self, rec: Any, rel: str, row: int) -> RawDoc:
        input_id = f"{rel}:{row}"
        doc = RawDoc(input_id=input_id, source="obelics", meta={"source_path": rel, "row": row})
        try:
            doc.parts = self._parts(rec)
        except BadRecord:
            doc.error = "bad_record"
        except UnicodeDecodeError:
            doc.error = "bad_encoding"
        if isinstance(rec, dict):
            url = rec.get("url")
            if url is None and isinstance(rec.get("general_metadata"), str):
                try:
                    url = json.loads(rec["general_metadata"]).get("url")
                except (json.JSONDecodeError, AttributeError):
                    url = None
            if isinstance(url, str):
                doc.meta["url"] = url
            if isinstance(rec.get("id"), (str, int)):
                doc.meta["record_id"] = rec["id"]
        return doc

    def _parts(self, rec: Any) -> list:
        if not isinstance(rec, dict):
            raise BadRecord
        texts, images = rec.get("texts"), rec.get("images")
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise BadRecord
        parts: list = []
        for text, image in zip(texts, images):
            if (text is None) == (image is None):
                raise BadRecord
            if text is not None:
                if isinstance(text, (bytes, bytearray)):
                    text = bytes(text).decode("utf-8")
                if not isinstance(text, str):
                    raise BadRecord
                if parts and isinstance(parts[-1], RawText):
                    parts[-1].text += "\n\n" + text
                else:
                    parts.append(RawText(text))
            else:
                parts.append(self._image(image))
        return parts

    def _image(self, value: Any) -> RawImage:
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if isinstance(data, str):  # JSON carries bytes as base64
                try:
                    data = base64.b64decode(data, validate=True)
                except (binascii.Error, ValueError):
                    return RawImage(error="bad_image", src=str(path or "")[:512])
            if isinstance(data, (bytes, bytearray)) and data:
                return RawImage(data=bytes(data), src=str(path or "bytes")[:512])
            value = path
        if isinstance(value, (bytes, bytearray)):
            return RawImage(data=bytes(value), src="bytes")
        if not isinstance(value, str):
            raise BadRecord
        if value.strip().lower().startswith("data:"):
            return image_from_data_uri(value.strip())
        root = self._image_root
        path, err = resolve_reference(root, root, value)
        if err:
            return RawImage(error=err, src=value[:512])
        data, err = read_bounded(path, self.max_image_bytes)
        return RawImage(data=data, error=err, src=os.path.relpath(path, root).replace(os.sep, "/"))
