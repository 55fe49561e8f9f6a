"""Ray Data ingest: WebDataset shards -> fixed columns -> CPU packing actors -> training rows.

    read_webdataset (raw bytes, nothing decoded or unpickled), one read per epoch of the plan
      -> normalize_samples   fixed columns right after reading (documents have varying image members,
                             which would otherwise give each block a different, sparse schema), plus
                             the row's plan entry
      -> PackDocuments       callable-class actors: parse, decode + resize images, tokenize, pack
      -> Ray Train's get_dataset_shard per worker -> iter_torch_batches (only stacking left to do)

Documents that cannot be used are counted per reason in the `dropped_*` columns of the rows that follow
them, so the loop can log them; nothing is lost silently.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.schema import IMAGE_FIELD_RE, SchemaError, parse_document
from data_prep.tokenizer import load_tokenizer
from pipeline.packing import ImageDecoder, PackSpec, Tokenizer, pack_documents
from pipeline.plan import DataPlan, DataState, latest_data_state

# reasons a document is dropped in the ingest; each becomes a column `dropped_<reason>`
DROP_REASONS = ("bad_json", "bad_image", "image_too_large", "no_text", "missing_image")
# columns the training loop does not feed to the model
BOOKKEEPING = ("plan_idx", "docs_done") + tuple(f"dropped_{r}" for r in DROP_REASONS)


def normalize_samples(df: pd.DataFrame, plan_idx_of_path: dict[str, int] | None = None) -> pd.DataFrame:
    """WebDataset rows (one column per member suffix, sparse) -> key, json, image_fields, image_bytes,
    plan_idx (the plan entry the row was read for; -1 outside a plan)."""
    image_cols = sorted(c for c in df.columns if IMAGE_FIELD_RE.match(str(c)))
    keys, docs, fields, blobs, plan = [], [], [], [], []
    for _, row in df.iterrows():
        keys.append(str(row["__key__"]))
        j = row.get("json")
        docs.append(j if isinstance(j, (bytes, bytearray)) else b"")
        f, b = [], []
        for c in image_cols:
            v = row[c]
            if isinstance(v, (bytes, bytearray)):
                f.append(c)
                b.append(bytes(v))
        fields.append(f)
        blobs.append(b)
        plan.append(plan_idx_of_path.get(_local(row.get("__url__", "")), -1) if plan_idx_of_path else -1)
    return pd.DataFrame({"key": keys, "json": docs, "image_fields": fields, "image_bytes": blobs,
                         "plan_idx": np.asarray(plan, np.int32)})


def _local(url: str) -> str:
    return str(url).removeprefix("file://")


class PackDocuments:
    """A Ray Data actor: one block of documents in, packed training rows out."""

    def __init__(self, tokenizer_path: str, seq_len: int, image_size: int, patch_size: int, pack_docs: int):
        self.pack_docs = pack_docs
        self.tok = Tokenizer(load_tokenizer(Path(tokenizer_path)))
        self.spec = PackSpec(seq_len, image_size, patch_size)
        self.decode = ImageDecoder(image_size)

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Called once per block (batch_size=None): the reader cuts blocks at fixed document counts
        # within one shard, so grouping by position inside the block gives the same rows on every run,
        # however Ray bundles blocks into tasks. Documents of different plan entries never share a row.
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
            return self._pack(block, -1)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _pack(self, batch: dict[str, np.ndarray], plan_idx: int) -> dict[str, np.ndarray]:
        dropped: dict[str, int] = {}
        docs = []
        for doc_json, fields, blobs in zip(batch["json"], batch["image_fields"], batch["image_bytes"]):
            try:
                docs.append(parse_document(bytes(doc_json), dict(zip(fields, (bytes(b) for b in blobs)))))
            except SchemaError as e:
                reason = "missing_image" if "missing image" in str(e) else "bad_json"
                dropped[reason] = dropped.get(reason, 0) + 1
        out = pack_documents(docs, self.tok, self.spec, self.decode, dropped)
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
        elif dropped:
            # a group with every document dropped yields no row to carry its counts: say so here
            print(f"[ingest] {len(batch['json'])} documents produced no rows; dropped: {json.dumps(dropped)}",
                  flush=True)
        return out


def _configure_context() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # same plan -> same rows in the same order
    ctx.execution_options.preserve_order = True
    # one progress line per logging step comes from the loop; Ray Data's bars would interleave with it
    ctx.enable_progress_bars = False


def _pack_stage(ds, tokenizer_path, seq_len, image_size, patch_size, pack_docs, pack_actors):
    import ray.data

    return ds.map_batches(
        PackDocuments,
        fn_constructor_kwargs=dict(tokenizer_path=tokenizer_path, seq_len=seq_len, image_size=image_size,
                                   patch_size=patch_size, pack_docs=pack_docs),
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pack_actors),
    )


def build_dataset(plan: DataPlan, entries: list[int], tokenizer_path: str, seq_len: int, image_size: int,
                  patch_size: int, pack_docs: int, pack_actors: int):
    """The stream of packed rows for the given plan entries (in plan order)."""
    import ray.data

    if not entries:
        raise ValueError("the data plan has no entry left to read")
    _configure_context()
    # consecutive entries are read together as long as no path repeats, so the path of a row names
    # its plan entry; the reads are then concatenated in plan order
    groups: list[list[int]] = [[]]
    seen: set[str] = set()
    for i in entries:
        path = plan.shards[plan.entries[i].shard].path
        if path in seen:
            groups.append([])
            seen = set()
        groups[-1].append(i)
        seen.add(path)
    parts = []
    for idx in groups:
        paths = [plan.shards[plan.entries[i].shard].path for i in idx]
        read = ray.data.read_webdataset(paths, decoder=None, override_num_blocks=len(paths))
        parts.append(read.map_batches(normalize_samples, batch_format="pandas",
                                      fn_kwargs={"plan_idx_of_path": dict(zip(paths, idx))}))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return _pack_stage(ds, tokenizer_path, seq_len, image_size, patch_size, pack_docs, pack_actors)


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
    data position of the newest checkpoint of the run: consumed plan entries are not read again.
    """

    def __init__(self, plan: DataPlan, run_dir: str, tokenizer_path: str, seq_len: int, image_size: int,
                 patch_size: int, pack_docs: int, pack_actors: int, start_docs_done: list[int] | None = None):
        self.plan_json = plan.to_json()
        self.run_dir = run_dir
        # where a run without checkpoints of its own starts: a continued retrofit starts at its dense
        # checkpoint's data position
        self.start_docs_done = start_docs_done
        self.kwargs = dict(tokenizer_path=tokenizer_path, seq_len=seq_len, image_size=image_size,
                           patch_size=patch_size, pack_docs=pack_docs, pack_actors=pack_actors)

    def remaining(self) -> list[int]:
        plan = DataPlan.from_json(self.plan_json)
        latest = latest_data_state(Path(self.run_dir))
        if latest is None and self.start_docs_done is not None:
            return DataState(self.start_docs_done).remaining_entries(plan)
        return latest[1].remaining_entries(plan) if latest else list(range(len(plan.entries)))

    def __call__(self):
        plan = DataPlan.from_json(self.plan_json)
        remaining = self.remaining()
        if len(remaining) < len(plan.entries):
            print(f"[ingest] resuming the data plan: {len(plan.entries) - len(remaining)} of "
                  f"{len(plan.entries)} shard reads already consumed", flush=True)
        return build_dataset(plan, remaining, **self.kwargs)
