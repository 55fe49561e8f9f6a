"""A corpus -> deduplicated shards + manifest: deterministic, parallel, resumable.

    msa-prep html INPUT_DIR --output OUT_DIR [--workers N | --ray-address auto]

1. Plan: the reader splits the input into work units of `unit_docs` input documents, in input order
   (the grain of parallelism and of resume; the output does not depend on it).
2. Normalize (parallel, one task per unit): `units.process_unit` writes `.work/part-NNNNNN.tar` and
   its record. Units whose record matches (same input files, settings and code) are skipped.
3. Decide (here, one pass over the records in unit order): exact dedup, first occurrence wins
   (`dedup.py`); the surviving documents are cut, in input order, into shards of at most
   `shard_docs` documents and about `shard_bytes`.
4. Write (parallel, one task per shard): `units.write_shard` -> `shard-NNNNNN.tar` (temp + rename)
   and its record. A shard whose record matches its planned content and whose file is there is skipped.
5. `manifest.json`, written last (the old one is removed when a run starts); spill parts are deleted.

Every step depends only on the input and the settings, so any number of workers, local processes or
Ray, gives the same bytes; an interrupted run re-run with the same arguments redoes only what is missing.
Cost of the design: normalized documents are written twice (spill part, then shard; both sequential
I/O, small next to decoding), and the dedup keeps two sets of digests in memory.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import PIL

from data_prep import dedup, units
from data_prep.executor import Executor, default_workers
from data_prep.normalize import NormalizeConfig
from data_prep.progress import Progress
from data_prep.readers import Reader
from data_prep.schema import FORMAT_VERSION, MANIFEST_NAME, shard_name
from data_prep.shards import Manifest, ShardInfo

# Bump when the output for the same input and settings changes, so a resume never mixes versions.
CODE_VERSION = 1
WORK_DIR = ".work"


class NoInput(Exception):
    """The input holds no documents at all (an empty folder, a wrong path): nothing to convert."""


class OutputBusy(Exception):
    """Another conversion is writing the same output directory."""


@dataclass
class ConvertOptions:
    created_by: str
    shard_docs: int = 500
    unit_docs: int = 100
    shard_bytes: int = 8 * 2**20
    workers: int = field(default_factory=default_workers)
    ray_address: str | None = None
    dedup_documents: bool = True
    dedup_images: bool = True
    quiet: bool = False
    extra: dict = field(default_factory=dict)  # recorded in the manifest


@dataclass
class ConvertResult:
    manifest: Manifest
    units_run: int = 0
    units_skipped: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    normalize_seconds: float = 0.0


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _clean_temporaries(out: Path, work: Path) -> None:
    """Temp files of an interrupted run (hidden names, never read): remove them."""
    for d in (out, work):
        for p in d.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)


@contextmanager
def _output_lock(work: Path):
    """One conversion at a time per output directory (an advisory lock, released when the run ends)."""
    with open(work / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputBusy(f"another msa-prep is writing {work.parent}") from None
        yield


def convert(reader: Reader, out_dir: Path, cfg: NormalizeConfig, opts: ConvertOptions,
            on_unit_done: Callable[[int], None] | None = None) -> ConvertResult:
    """`on_unit_done(i)` is called after unit i is normalized (tests use it to interrupt a run)."""
    t0 = time.perf_counter()
    reader.max_image_bytes = cfg.max_image_bytes
    specs = reader.plan(opts.unit_docs)
    if not specs:
        raise NoInput(f"no input documents found in {reader.describe().get('input', reader.describe())}")
    out = Path(out_dir).resolve()
    work = out / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    with _output_lock(work), Executor(opts.workers, opts.ray_address) as ex:
        result = _run(reader, specs, out, work, cfg, opts, ex, on_unit_done)
    result.seconds = time.perf_counter() - t0
    return result


def _run(reader: Reader, specs: list[dict], out: Path, work: Path, cfg: NormalizeConfig, opts: ConvertOptions,
         ex: Executor, on_unit_done: Callable[[int], None] | None) -> ConvertResult:
    _clean_temporaries(out, work)
    old_manifest = _read_old_manifest(out)
    (out / MANIFEST_NAME).unlink(missing_ok=True)

    base = _digest(CODE_VERSION, PIL.__version__, reader.describe(), cfg.to_json())
    unit_digests = [_digest(base, i, spec) for i, spec in enumerate(specs)]
    records: list[dict | None] = [None] * len(specs)
    for i, d in enumerate(unit_digests):
        rec = units.read_json(units.part_record_path(work, i))
        if rec is not None and rec.get("digest") == d:
            records[i] = rec
    result = ConvertResult(manifest=Manifest(FORMAT_VERSION, opts.created_by))
    result.units_skipped = sum(r is not None for r in records)

    def normalize(todo: list[int]) -> None:
        bar = Progress("normalize", sum(specs[i]["n"] for i in todo), enabled=not opts.quiet)
        calls = [(reader, specs[i], cfg, str(work), i, unit_digests[i]) for i in todo]
        for j, rec in ex.run(units.process_unit, calls):
            records[todo[j]] = rec
            bar.update(rec["inputs"], rec["documents"], rec["images"])
            if on_unit_done is not None:
                on_unit_done(todo[j])
        bar.close()
        result.units_run += len(todo)

    t1 = time.perf_counter()
    normalize([i for i, r in enumerate(records) if r is None])
    result.normalize_seconds = time.perf_counter() - t1

    decision = dedup.decide(records, opts.dedup_documents, opts.dedup_images)
    plan = dedup.cut_shards(decision.kept, opts.shard_docs, opts.shard_bytes)
    shard_base = _digest(base, opts.dedup_documents, opts.dedup_images)
    entries = [[[d.unit, d.id, d.sha256, d.drop] for d in shard] for shard in plan]
    shard_digests = [_digest(shard_base, i, e) for i, e in enumerate(entries)]

    done: dict[int, dict] = {}
    for i, d in enumerate(shard_digests):
        rec = units.read_json(units.shard_record_path(work, i))
        path = out / shard_name(i)
        if rec is not None and rec.get("digest") == d and path.exists() and path.stat().st_size == rec["info"]["bytes"]:
            done[i] = rec
    todo = [i for i in range(len(plan)) if i not in done]
    # the shards still to write need their spill parts; parts deleted after an earlier finished run
    # are made again (same input, same settings: the same records)
    needed = sorted({e[0] for i in todo for e in entries[i]})
    missing = [u for u in needed if not units.part_path(work, u).exists()]
    if missing:
        normalize(missing)
    result.units_skipped -= len(missing)

    bar = Progress("write", sum(len(plan[i]) for i in todo), enabled=not opts.quiet)
    calls = [(str(work), str(out), i, entries[i], shard_digests[i]) for i in todo]
    for j, rec in ex.run(units.write_shard, calls):
        done[todo[j]] = rec
        bar.update(rec["info"]["documents"], rec["info"]["documents"], rec["info"]["images"])
    bar.close()
    result.shards_written, result.shards_skipped = len(todo), len(plan) - len(todo)

    # shards of an earlier run with other settings that this plan does not have
    for p in out.glob("shard-*.tar"):
        if p.name not in {shard_name(i) for i in range(len(plan))}:
            p.unlink()
    for pattern, n in (("shard-*.json", len(plan)), ("part-*.json", len(specs))):
        for p in work.glob(pattern):
            if int(p.stem.split("-")[1]) >= n:
                p.unlink()

    m = result.manifest
    m.extra = {"input": reader.describe(), "normalize": cfg.to_json(),
               "dedup": {"documents": opts.dedup_documents, "images": opts.dedup_images},
               "shard_docs": opts.shard_docs, "shard_bytes": opts.shard_bytes, **opts.extra}
    m.inputs = sum(r["inputs"] for r in records)
    rejected = sum((Counter(r["rejected"]) for r in records), decision.rejected)
    images_rejected = sum((Counter(r["images_rejected"]) for r in records), decision.images_rejected)
    m.rejected, m.images_rejected = dict(sorted(rejected.items())), dict(sorted(images_rejected.items()))
    for i in range(len(plan)):
        m.add_shard(ShardInfo(**done[i]["info"]))
    if m.inputs != m.documents + sum(m.rejected.values()):
        raise RuntimeError(f"accounting: {m.inputs} inputs != {m.documents} written + {m.rejected} rejected")
    if old_manifest is not None and old_manifest.get("shards") == m.shards:
        m.tokenizer = old_manifest.get("tokenizer")  # same shards: the tokenizer trained on them still fits
    m.write(out)
    for p in work.glob("part-*.tar"):
        p.unlink()
    return result


def _read_old_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
