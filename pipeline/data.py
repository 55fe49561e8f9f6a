"""Ray Data ingest: WebDataset shards -> fixed columns -> CPU packing actors -> training rows.

    from_items(one read unit per plan entry: shard path, plan entry, documents in the manifest)
      -> read_units        tolerant tar reading (data_prep.reader.iter_stream): fixed columns per
                           sample (documents have a varying number of image members, which would
                           otherwise give each block a different, sparse schema); nothing decoded or
                           unpickled; a shard that breaks off, an unsafe member name or a manifest
                           that promises more documents than the tar holds become *loss rows* that
                           carry the reason and the number of documents lost
      -> PackDocuments     callable-class actors: parse, decode + resize images, tokenize, pack
      -> Ray Train's get_dataset_shard per worker -> iter_torch_batches (only stacking left to do)

Ray's own `read_webdataset` fails the whole dataset (and so the training run) on the first truncated
tar; a long run must instead skip what it cannot read, count it, and go on. Every document that
cannot be used is counted under its reason in the `dropped_*` columns of the rows that follow it (the
loop logs them as `train/skipped_samples/<reason>`); nothing is lost silently.

Exactly-once across restarts: every row carries the ids of its pieces (`piece_ids`) and of the
documents dropped before it. The training loop saves the ids it trained on with each checkpoint
(pipeline/plan.py, DataState); a resumed stream reads only the plan entries not yet consumed and drops
the pieces and documents it has seen before packing.
"""
from __future__ import annotations

from pathlib import Path
from typing import IO, Iterator

import numpy as np
import pandas as pd

from data_prep.reader import StreamBroken, iter_stream
from data_prep.schema import IMAGE_FIELD_RE, SchemaError, parse_document
from data_prep.tokenizer import load_tokenizer
from pipeline.packing import DocumentError, ImageDecoder, PackSpec, Tokenizer, carrier_row, empty_columns, \
    pack_pieces, piece_uid, tokenize_document
from pipeline.plan import DataPlan, DataState

# reasons a document is skipped in the ingest; each becomes a column `dropped_<reason>`
DROP_REASONS = ("bad_json", "missing_json", "bad_image", "image_too_large", "no_text", "missing_image",
                "truncated_shard", "unsafe_member", "missing_shard")
# columns the training loop does not feed to the model
BOOKKEEPING = ("plan_idx", "docs_done", "piece_ids") + tuple(f"dropped_{r}" for r in DROP_REASONS)
READ_CHUNK_DOCS = 64  # samples per block out of the reader


def _open(path: str) -> IO[bytes]:
    if "://" in path:  # object storage (s3://, gs://) through pyarrow's file systems
        import pyarrow.fs

        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        return fs.open_input_stream(inner)
    return open(path, "rb")


def _columns(rows: list[tuple]) -> pd.DataFrame:
    keys, docs, fields, blobs, plan, reasons, counts = zip(*rows)
    return pd.DataFrame({"key": list(keys), "json": list(docs), "image_fields": list(fields),
                         "image_bytes": list(blobs), "plan_idx": np.asarray(plan, np.int32),
                         "skip_reason": list(reasons), "skip_count": np.asarray(counts, np.int32)})


def read_shard(path: str, plan_idx: int, expected_docs: int, chunk: int = READ_CHUNK_DOCS) -> Iterator[pd.DataFrame]:
    """One shard as blocks of fixed columns; damage becomes loss rows (key "#<reason>")."""
    rows: list[tuple] = []
    n_samples = 0
    broken: StreamBroken | None = None
    occurrences: dict[str, int] = {}
    try:
        stream = _open(path)
    except OSError as e:
        print(f"[ingest] cannot open {path}: {e}; its {expected_docs} documents are skipped", flush=True)
        yield _columns([("#missing_shard", b"", [], [], plan_idx, "missing_shard", expected_docs)])
        return
    with stream:
        for item in iter_stream(stream):
            if isinstance(item, StreamBroken):
                broken = item
                break
            n_samples += 1
            # a key seen before in this shard (a damaged or badly written tar) gets its own identity,
            # so the position bookkeeping never mistakes one sample for the other
            seen = occurrences[item.key] = occurrences.get(item.key, 0) + 1
            if seen > 1:
                item.key = f"{item.key}@{seen}"
            if item.unsafe:
                print(f"[ingest] {path}: sample {item.key!r} rejected, unsafe members: {', '.join(item.unsafe)}",
                      flush=True)
                rows.append((item.key, b"", [], [], plan_idx, "unsafe_member", 1))
            else:
                fields = sorted(f for f in item.members if IMAGE_FIELD_RE.match(f))
                rows.append((item.key, item.members.get("json", b""), fields, [item.members[f] for f in fields],
                             plan_idx, "", 0))
            if len(rows) == chunk:
                yield _columns(rows)
                rows = []
    lost = expected_docs - n_samples
    if broken is not None or lost > 0:
        reason = broken.reason if broken else "truncated_shard"
        detail = broken.detail if broken else "the tar ends before the manifest's document count"
        print(f"[ingest] {path}: {max(lost, 0)} of {expected_docs} documents unreadable ({detail}); skipped and "
              f"counted as {reason}", flush=True)
        rows.append((f"#{reason}", b"", [], [], plan_idx, reason, max(lost, 0)))
    if rows:
        yield _columns(rows)


def read_units(batch: dict[str, np.ndarray], chunk: int = READ_CHUNK_DOCS) -> Iterator[pd.DataFrame]:
    """The reader stage: each unit (path, plan_idx, documents) is one shard of the plan."""
    for path, plan_idx, documents in zip(batch["path"], batch["plan_idx"], batch["documents"]):
        yield from read_shard(str(path), int(plan_idx), int(documents), chunk)


class PackDocuments:
    """A Ray Data actor: one block of documents in, packed training rows out.

    `done_ids` (plan entry -> ids) are the pieces and dropped documents a resumed run has trained on
    or counted already: they are left out here.
    """

    def __init__(self, tokenizer_path: str, seq_len: int, image_size: int, patch_size: int, pack_docs: int,
                 done_ids: dict[int, list[int]] | None = None):
        self.pack_docs = pack_docs
        self.tok = Tokenizer(load_tokenizer(Path(tokenizer_path)))
        # a row holds at most seq_len pieces, and its group's dropped documents
        self.spec = PackSpec(seq_len, image_size, patch_size, id_slots=seq_len + pack_docs)
        self.decode = ImageDecoder(image_size)
        self.done = {int(e): set(v) for e, v in (done_ids or {}).items()}

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Called once per block (batch_size=None). Documents of different plan entries never share a row.
        n = len(block["json"])
        plan_idx = block["plan_idx"]
        parts = []
        start = 0
        while start < n:
            end = min(start + self.pack_docs, n)
            same = np.flatnonzero(plan_idx[start:end] != plan_idx[start])
            end = start + int(same[0]) if len(same) else end
            parts.append(self._pack({k: v[start:end] for k, v in block.items()}, int(plan_idx[start])))
            start = end
        if not parts:
            return self._columns(empty_columns(self.spec), -1, {})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _pack(self, batch: dict[str, np.ndarray], plan_idx: int) -> dict[str, np.ndarray]:
        done = self.done.get(plan_idx, set())
        dropped: dict[str, int] = {}
        drop_ids: list[int] = []
        pieces = []
        for key, doc_json, fields, blobs, reason, count in zip(batch["key"], batch["json"], batch["image_fields"],
                                                               batch["image_bytes"], batch["skip_reason"],
                                                               batch["skip_count"]):
            drop_uid = piece_uid(str(key), -1)
            if drop_uid in done:  # counted before the restart
                continue
            if reason:  # a loss the reader recorded
                dropped[reason] = dropped.get(reason, 0) + int(count)
                drop_ids.append(drop_uid)
                continue
            try:
                if not len(doc_json):
                    raise DocumentError("missing_json")
                doc = parse_document(bytes(doc_json), dict(zip(fields, (bytes(b) for b in blobs))))
                doc_pieces = tokenize_document(doc, self.tok, self.spec, self.decode)
            except SchemaError as e:
                reason = "missing_image" if "missing image" in str(e) else "bad_json"
                dropped[reason] = dropped.get(reason, 0) + 1
                drop_ids.append(drop_uid)
                continue
            except DocumentError as e:
                dropped[e.reason] = dropped.get(e.reason, 0) + 1
                drop_ids.append(drop_uid)
                continue
            for i, p in enumerate(doc_pieces):
                p.uid = piece_uid(str(key), i)
            pieces += [p for p in doc_pieces if p.uid not in done]
        if not pieces and not dropped:
            return self._columns(empty_columns(self.spec), plan_idx, {})
        # a group whose every document was dropped still yields one row (all padding, no targets) to
        # carry its counts to the loop: the loss is logged, and the data position moves past it
        out = pack_pieces(pieces, self.spec, self.tok.pad, extra_ids=drop_ids) if pieces else \
            carrier_row(self.spec, self.tok.pad, drop_ids)
        return self._columns(out, plan_idx, dropped)

    @staticmethod
    def _columns(out: dict[str, np.ndarray], plan_idx: int, dropped: dict[str, int]) -> dict[str, np.ndarray]:
        R = len(out["tokens"])
        out["plan_idx"] = np.full((R,), plan_idx, np.int32)
        for reason in DROP_REASONS:
            col = np.zeros((R,), np.int32)
            if R:
                col[0] = dropped.get(reason, 0)
            out[f"dropped_{reason}"] = col
        if R:
            # a dropped document is consumed too, as far as the data position is concerned
            out["docs_done"][0] += sum(dropped.values())
        return out


def _configure_context() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # same plan -> same rows in the same order
    ctx.execution_options.preserve_order = True
    # one progress line per logging step comes from the loop; Ray Data's bars would interleave with it
    ctx.enable_progress_bars = False
    # Ray Data's high-memory detector repeats a 15-line warning every 30 s when a map worker uses more
    # memory than it reserved (the pack actors at long rows: ~3 GiB each). Its concern, Ray starting
    # more such workers than memory allows, does not arise for a fixed-size pool of data.pack_actors
    # actors (its memory is that setting's choice), so the warning is switched off here rather than
    # left to bury the progress lines
    detectors = getattr(ctx, "issue_detectors_config", None)
    if detectors is not None and hasattr(detectors, "high_memory_detector_config"):
        detectors.high_memory_detector_config.detection_time_interval_s = -1


def ingest_config():
    """Ray Train's data config for the training stream: the rows in plan order.

    Ray Train replaces a training dataset's execution options with its own when it splits the stream
    across the workers, taken from the DataContext of the process that does the split; there
    `preserve_order` was not always set, and then the packing actor's in-flight tasks delivered rows
    in the order they finished: two runs with the same seed trained on the same documents in another
    order (a study's dense and native arms, seen once on 2 cores). So they are given here: the
    options every dataset of this module runs with (`_configure_context`)."""
    import ray.train

    _configure_context()  # Ray Train's defaults are read from this process's context
    return ray.train.DataConfig(execution_options=ray.train.DataConfig.default_ingest_options())


def build_dataset(plan: DataPlan, entries: list[int], tokenizer_path: str, seq_len: int, image_size: int,
                  patch_size: int, pack_docs: int, pack_actors: int, done_ids: dict[int, list[int]] | None = None):
    """The stream of packed rows for the given plan entries (in plan order)."""
    import ray.data

    if not entries:
        raise ValueError("the data plan has no entry left to read")
    _configure_context()
    units = [{"path": plan.shards[plan.entries[i].shard].path, "plan_idx": i,
              "documents": plan.shards[plan.entries[i].shard].documents} for i in entries]
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    # one pack group per block, starting at the shard's first document (the same rows on every run)
    ds = ds.map_batches(read_units, batch_size=1, batch_format="numpy", fn_kwargs={"chunk": pack_docs})
    done = {int(e): sorted(v) for e, v in (done_ids or {}).items() if int(e) in set(entries)}
    return ds.map_batches(
        PackDocuments,
        fn_constructor_kwargs=dict(tokenizer_path=tokenizer_path, seq_len=seq_len, image_size=image_size,
                                   patch_size=patch_size, pack_docs=pack_docs, done_ids=done),
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pack_actors),
    )


def build_simple_dataset(shard_dirs: list[str], tokenizer_path: str, seq_len: int, image_size: int,
                         patch_size: int, pack_docs: int, pack_actors: int):
    """Every shard of the given directories once, in manifest order (evaluation, tests)."""
    from pipeline.plan import build_plan

    plan = build_plan(shard_dirs, [], tokens_needed=0, image_tokens=0, seed=0)
    first_epoch = [i for i, e in enumerate(plan.entries) if e.epoch == 0]
    first_epoch.sort(key=lambda i: plan.entries[i].shard)
    return build_dataset(plan, first_epoch, tokenizer_path, seq_len, image_size, patch_size, pack_docs,
                         pack_actors)


class DatasetFactory:
    """Builds the training stream when Ray Train (re)starts the worker group.

    Ray Train calls it at every start of the workers, after a failure too, so the stream resumes at the
    data position of the run's newest checkpoint: consumed plan entries are not read again, and pieces
    already trained on are left out of the others.
    """

    def __init__(self, plan: DataPlan, run_dir: str, tokenizer_path: str, seq_len: int, image_size: int,
                 patch_size: int, pack_docs: int, pack_actors: int, start_state: DataState | None = None):
        self.plan_json = plan.to_json()
        self.run_dir = run_dir
        # where a run without checkpoints of its own starts: a continued retrofit starts at its dense
        # checkpoint's data position (schedule.retrofit_continue)
        self.start_state = start_state.to_json() if start_state else None
        self.kwargs = dict(tokenizer_path=tokenizer_path, seq_len=seq_len, image_size=image_size,
                           patch_size=patch_size, pack_docs=pack_docs, pack_actors=pack_actors)

    def state(self) -> DataState:
        from pipeline.checkpoint import latest_checkpoint, read_data_state

        plan = DataPlan.from_json(self.plan_json)
        newest = latest_checkpoint(Path(self.run_dir))
        if newest:
            return read_data_state(newest)
        return DataState.from_json(self.start_state) if self.start_state else DataState.empty(plan)

    def __call__(self):
        plan = DataPlan.from_json(self.plan_json)
        state = self.state()
        remaining = state.remaining_entries(plan)
        if len(remaining) < len(plan.entries) or state.done_ids:
            print(f"[ingest] resuming the data plan: {len(plan.entries) - len(remaining)} of {len(plan.entries)} "
                  f"shard reads consumed, {sum(len(v) for v in state.done_ids.values())} pieces of the others "
                  f"already trained on", flush=True)
        return build_dataset(plan, remaining, done_ids={e: sorted(v) for e, v in state.done_ids.items()},
                             **self.kwargs)
