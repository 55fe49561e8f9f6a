"""Image-caption pairs in the img2dataset layout: tar shards, or folders of key.jpg / key.txt / key.json.

    msa-prep pairs INPUT --output OUT_DIR

INPUT is a `.tar` file or a directory. In a directory, every `*.tar` (sorted by relative path) is read
as WebDataset shards (members grouped by key, in archive order; only regular members are read, and
nothing is ever extracted to disk), then the loose files (sorted by key), grouped by key: the path up to
the first dot of the file name. A sample is a key with an image file (jpg, jpeg, png, webp, gif, bmp,
tif, tiff) or a `.txt`; json-only keys (img2dataset's `*_stats.json`) are not samples.

A sample becomes a two-segment document: the image, then its caption (`.txt`, UTF-8; else the json's
`caption`). The document needs its image: one that is missing or rejected rejects the document under
the image's reason. The json's `url` is kept in meta.
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator

from data_prep.raw import RawDoc, RawImage, RawText
from data_prep.readers import MAX_TEXT_FILE_BYTES, Reader, chunks
from data_prep.safepath import is_inside, read_bounded, real_root

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


def split_key(name: str) -> tuple[str, str]:
    """"dir/000001.jpg" -> ("dir/000001", "jpg") (the WebDataset rule: the first dot of the file name)."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def is_sample(exts) -> bool:
    return any(e in IMAGE_EXTS or e == "txt" for e in exts)


@dataclass
class PairsReader(Reader):
    input_path: str
    name = "pairs"

    @property
    def _root(self) -> str:
        p = real_root(self.input_path)
        return p if os.path.isdir(p) else os.path.dirname(p)

    def describe(self) -> dict:
        return {"format": "pairs", "input": real_root(self.input_path)}

    # ---- planning
    def plan(self, unit_docs: int) -> list[dict]:
        p = real_root(self.input_path)
        if not os.path.isdir(p):
            return self._plan_tar(os.path.basename(p), unit_docs)
        tars, loose = [], {}
        for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
            dirnames.sort()
            for f in filenames:
                rel = os.path.relpath(os.path.join(dirpath, f), p).replace(os.sep, "/")
                if f.lower().endswith(".tar"):
                    tars.append(rel)
                else:
                    key, ext = split_key(rel)
                    loose.setdefault(key, {})[ext] = rel
        units = []
        for rel in sorted(tars):
            units += self._plan_tar(rel, unit_docs)
        samples = [[k, sorted(v.items())] for k, v in sorted(loose.items()) if is_sample(v)]
        for group in chunks(samples, unit_docs):
            for _, files in group:  # sizes and mtimes only make the resume digest notice changed inputs
                for entry in files:
                    try:
                        st = os.stat(os.path.join(p, entry[1]))
                        entry += (st.st_size, st.st_mtime_ns)
                    except OSError:
                        entry += (-1, 0)
            units.append({"kind": "files", "samples": group, "n": len(group)})
        return json.loads(json.dumps(units))  # tuples -> lists: the spec is what the digest hashes

    def _plan_tar(self, rel: str, unit_docs: int) -> list[dict]:
        path = os.path.join(self._root, rel)
        try:
            st = os.stat(path)
        except OSError:
            return [{"kind": "bad", "file": rel, "reason": "bad_file", "n": 1}]
        stamp = [st.st_size, st.st_mtime_ns]
        if st.st_size == 0:
            return [{"kind": "bad", "file": rel, "reason": "empty_file", "n": 1, "stat": stamp}]
        n, last, broken = 0, None, False
        try:
            with tarfile.open(path, mode="r:") as tar:  # seekable: reads headers, seeks over data
                for m in tar:
                    if m.isreg():
                        key, _ = split_key(m.name)
                        if key != last:
                            n, last = n + 1, key
        except (tarfile.TarError, OSError, EOFError):
            broken = True
        units = [{"kind": "tar", "file": rel, "start": s, "stop": min(s + unit_docs, n),
                  "n": min(unit_docs, n - s), "stat": stamp} for s in range(0, n, unit_docs)]
        if broken:  # the unreadable rest of the archive is one input, rejected
            units.append({"kind": "bad", "file": rel, "reason": "bad_file", "n": 1, "stat": stamp})
        return units

    # ---- reading
    def read(self, spec: dict) -> Iterator[RawDoc]:
        if spec["kind"] == "bad":
            yield RawDoc(input_id=spec["file"], source="pairs", error=spec["reason"],
                         meta={"source_path": spec["file"]})
        elif spec["kind"] == "tar":
            yield from self._read_tar(spec)
        else:
            yield from self._read_files(spec)

    def _read_tar(self, spec: dict) -> Iterator[RawDoc]:
        rel = spec["file"]
        idx, last, members = -1, None, {}
        with tarfile.open(os.path.join(self._root, rel), mode="r:") as tar:
            for m in tar:
                if not m.isreg():
                    continue
                key, ext = split_key(m.name)
                if key != last:
                    if spec["start"] <= idx < spec["stop"] and is_sample(members):
                        yield self._doc(f"{rel}:{last}", members)
                    idx, last, members = idx + 1, key, {}
                    if idx >= spec["stop"]:
                        return
                if idx < spec["start"] or ext in members:
                    continue
                limit = MAX_TEXT_FILE_BYTES if ext in ("txt", "json") else self.max_image_bytes
                if m.size == 0:
                    members[ext] = "empty_file"
                elif m.size > limit:
                    members[ext] = "file_too_large" if ext in ("txt", "json") else "image_too_large"
                else:
                    members[ext] = tar.extractfile(m).read()
        if spec["start"] <= idx < spec["stop"]:
            yield self._doc(f"{rel}:{last}", members)

    def _read_files(self, spec: dict) -> Iterator[RawDoc]:
        root = self._root
        for key, files in spec["samples"]:
            members: dict[str, bytes | str] = {}
            for ext, rel, *_ in files:
                path = os.path.join(root, rel)
                if not is_inside(root, os.path.realpath(path)):
                    members[ext] = "outside_root"
                    continue
                limit = MAX_TEXT_FILE_BYTES if ext in ("txt", "json") else self.max_image_bytes
                data, err = read_bounded(path, limit, too_large="file_too_large" if ext in ("txt", "json")
                                         else "image_too_large")
                members[ext] = data if data is not None else err
            yield self._doc(key, members)

    def _doc(self, input_id: str, members: dict[str, bytes | str]) -> RawDoc:
        """members: ext -> bytes, or the reason it could not be read."""
        doc = RawDoc(input_id=input_id, source="pairs", meta={"source_path": input_id}, require_image=True)
        info = members.get("json")
        if isinstance(info, bytes):
            try:
                info = json.loads(info.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                info = None
        if not isinstance(info, dict):
            info = {}
        if isinstance(info.get("url"), str):
            doc.meta["url"] = info["url"]
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            image = RawImage(error="missing_image")
        elif isinstance(members[ext], str):
            image = RawImage(error=members[ext], src=f"{input_id}.{ext}")
        else:
            image = RawImage(data=members[ext], src=f"{input_id}.{ext}")
        caption = members.get("txt")
        if isinstance(caption, str) and caption != "empty_file":  # a caption that could not be read
            doc.error = caption
            return doc
        if isinstance(caption, bytes):
            try:
                caption = caption.decode("utf-8")
            except UnicodeDecodeError:
                doc.error = "bad_encoding"
                return doc
        else:
            caption = info.get("caption") if isinstance(info.get("caption"), str) else ""
        doc.parts = [image, RawText(caption.strip())]
        return doc
