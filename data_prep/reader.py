"""Reading shards back into Documents on one machine (tokenizer training, inspection, tests).

The training pipeline does not use this: it streams shards through `ray.data.read_webdataset`.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterator

from data_prep.schema import Document, SchemaError, parse_document
from data_prep.shards import shard_paths


def iter_samples(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for each sample of one tar shard, in archive order."""
    key, members = None, {}
    with tarfile.open(tar_path, mode="r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            base = info.name.rsplit("/", 1)[-1]
            k, _, suffix = base.partition(".")
            data = tar.extractfile(info).read()
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            members[suffix] = data
    if key is not None:
        yield key, members


def iter_documents(shards_dir: Path, limit: int | None = None) -> Iterator[Document]:
    n = 0
    for path in shard_paths(shards_dir):
        for key, members in iter_samples(path):
            if "json" not in members:
                raise SchemaError(f"{path.name}: sample {key!r} has no .json member")
            images = {s: b for s, b in members.items() if s != "json"}
            yield parse_document(members["json"], images)
            n += 1
            if limit is not None and n >= limit:
                return
