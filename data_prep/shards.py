"""Writing documents into WebDataset tar shards, deterministically and atomically.

Shards are plain POSIX tar files whose members are grouped by sample key (the WebDataset
convention). Every header field that could vary between runs (mtime, owner, permissions) is fixed, so
the same documents give the same bytes. A shard is written under a temporary name and renamed when
complete: an interrupted run never leaves a half-written shard under a shard's name.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

from data_prep.schema import MANIFEST_NAME, Document


@dataclass
class ShardInfo:
    name: str
    documents: int = 0
    images: int = 0
    bytes: int = 0
    text_chars: int = 0
    sha256: str = ""

    @property
    def est_tokens(self) -> int:
        # A byte-level BPE on English prose gives ~4 characters per token; images are counted by the
        # pipeline once the patch size is known, so they are not included here.
        return self.text_chars // 4


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, docs: Iterable[Document]) -> ShardInfo:
    """Write one shard atomically (temp file + rename) and return its counts."""
    info = ShardInfo(name=path.name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for doc in docs:
                for suffix, data in doc.to_sample().items():
                    _add_member(tar, f"{doc.id}.{suffix}", data)
                info.documents += 1
                info.images += doc.n_images
                info.text_chars += sum(len(s.text) for s in doc.segments if s.type == "text")
        f.flush()
        os.fsync(f.fileno())
    data = tmp.read_bytes()
    info.bytes = len(data)
    info.sha256 = hashlib.sha256(data).hexdigest()
    os.replace(tmp, path)
    return info


@dataclass
class Manifest:
    """`OUT_DIR/manifest.json`: what a conversion read, wrote and rejected."""

    format_version: int
    created_by: str
    inputs: int = 0
    documents: int = 0
    images: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # documents, per reason
    images_rejected: dict[str, int] = field(default_factory=dict)  # image references dropped, per reason
    est_tokens: int = 0  # text tokens, all shards (see ShardInfo.est_tokens)
    shards: list[dict] = field(default_factory=list)
    tokenizer: str | None = None
    extra: dict = field(default_factory=dict)

    def add_shard(self, info: ShardInfo) -> None:
        self.shards.append({**asdict(info), "est_tokens": info.est_tokens})
        self.documents += info.documents
        self.images += info.images
        self.est_tokens += info.est_tokens

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n

    def write(self, out_dir: Path) -> Path:
        path = Path(out_dir) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, out_dir: Path) -> "Manifest":
        path = Path(out_dir) / MANIFEST_NAME
        try:
            body = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no manifest; is this a directory written by msa-prep?") from None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in known})  # newer writers may add fields


def shard_paths(shards_dir: Path) -> list[Path]:
    """The shards listed in a directory's manifest, in manifest order (absolute paths)."""
    manifest = Manifest.read(shards_dir)
    paths = [Path(shards_dir).resolve() / s["name"] for s in manifest.shards]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"shards listed in the manifest are missing: {missing[:3]}")
    return paths
