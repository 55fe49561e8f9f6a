"""Reading shards back: samples of one tar (strict, or tolerant for a long training stream), and
Documents on one machine (tokenizer training, inspection, tests).

A sample is the run of consecutive members that share a key (`<key>.<field>`, the WebDataset
convention). Member names are checked before anything else: an absolute name, a `..` component, a
backslash, a name in another directory than its sample's or a key the shard format does not allow
make the member *unsafe* — its sample is rejected, never read into anything. Nothing is unpickled:
members are bytes; only `.json` and image members are ever parsed, by the schema's own code.
"""
from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from data_prep.schema import KEY_RE, Document, SchemaError, parse_document
from data_prep.shards import shard_paths

# what a stream that breaks off raises: a truncated archive, a corrupt header, a failing disk
STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


@dataclass
class Sample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # field (suffix) -> bytes
    unsafe: list[str] = field(default_factory=list)  # member names refused (the sample must be rejected)


@dataclass
class StreamBroken:
    """The archive could not be read past this point (truncated, corrupt header); what follows is lost."""

    reason: str  # "truncated_shard"
    detail: str


def member_problem(name: str) -> str:
    """Why a member name is unsafe, or "" if it is fine. The key is the base name up to its first dot."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return "absolute or malformed name"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "a '.', '..' or empty path component"
    key, dot, suffix = parts[-1].partition(".")
    if not dot or not suffix or not KEY_RE.match(key):
        return "no valid <key>.<field> base name"
    return ""


def _split(name: str) -> tuple[str, str]:
    """member name -> (sample key with its directory, field)."""
    head, _, base = name.rpartition("/")
    key, _, suffix = base.partition(".")
    return (f"{head}/{key}" if head else key), suffix


def iter_stream(fileobj: IO[bytes], max_member_bytes: int = 1 << 30) -> Iterator[Sample | StreamBroken]:
    """Samples of one tar stream, in archive order, tolerant of damage: a stream that breaks off
    yields a StreamBroken last (the sample being read when it broke is not yielded)."""
    current: Sample | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, suffix = _split(info.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = Sample(key)
                problem = member_problem(info.name)
                if problem or info.size > max_member_bytes:
                    current.unsafe.append(f"{info.name} ({problem or f'{info.size} bytes'})")
                    continue
                current.members[suffix] = tar.extractfile(info).read()
        # tarfile ends an archive quietly at an invalid header past the first one: whatever follows
        # the point where it stopped must be the end-of-archive zeros, or the archive is damaged
        while chunk := fileobj.read(1 << 20):
            if chunk.strip(b"\0"):
                raise tarfile.ReadError("a corrupt member header (data follows where the archive seemed to end)")
    except STREAM_ERRORS as e:
        yield StreamBroken("truncated_shard", f"{type(e).__name__}: {e}")
        return
    if current is not None:
        yield current


def iter_samples(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for each sample of one tar shard, strict: any damage raises SchemaError."""
    with open(tar_path, "rb") as f:
        for item in iter_stream(f):
            if isinstance(item, StreamBroken):
                raise SchemaError(f"{tar_path}: unreadable past this point ({item.detail})")
            if item.unsafe:
                raise SchemaError(f"{tar_path}: sample {item.key!r} has unsafe members: {', '.join(item.unsafe)}")
            yield item.key, item.members


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
