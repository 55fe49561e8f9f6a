"""Ray Data ingest: WebDataset shards -> fixed columns -> CPU packing actors -> training rows.

    read_webdataset (raw bytes, nothing decoded or unpickled)
      -> normalize_samples   fixed columns right after reading (documents have varying image members,
                             which would otherwise give each block a different, sparse schema)
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
from data_prep.shards import shard_paths
from data_prep.tokenizer import load_tokenizer
from pipeline.packing import ImageDecoder, PackSpec, Tokenizer, pack_documents

# reasons a document is dropped in the ingest; each becomes a column `dropped_<reason>`
DROP_REASONS = ("bad_json", "bad_image", "image_too_large", "no_text", "missing_image")


def normalize_samples(df: pd.DataFrame) -> pd.DataFrame:
    """WebDataset rows (one column per member suffix, sparse) -> key, json, image_fields, image_bytes."""
    image_cols = sorted(c for c in df.columns if IMAGE_FIELD_RE.match(str(c)))
    keys, docs, fields, blobs = [], [], [], []
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
    return pd.DataFrame({"key": keys, "json": docs, "image_fields": fields, "image_bytes": blobs})


class PackDocuments:
    """A Ray Data actor: one batch of documents in, packed training rows out."""

    def __init__(self, tokenizer_path: str, seq_len: int, image_size: int, patch_size: int, pack_docs: int):
        self.pack_docs = pack_docs
        self.tok = Tokenizer(load_tokenizer(Path(tokenizer_path)))
        self.spec = PackSpec(seq_len, image_size, patch_size)
        self.decode = ImageDecoder(image_size)

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Called once per block (batch_size=None): blocks are cut by the reader at fixed document
        # counts, so grouping by position inside the block gives the same rows on every run, however
        # Ray bundles blocks into tasks.
        n = len(block["json"])
        parts = [self._pack({k: v[i:i + self.pack_docs] for k, v in block.items()})
                 for i in range(0, n, self.pack_docs)]
        if not parts:
            return self._pack(block)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _pack(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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
        for reason in DROP_REASONS:
            col = np.zeros((R,), np.int32)
            if R:
                col[0] = dropped.get(reason, 0)
            out[f"dropped_{reason}"] = col
        # a batch with every document dropped yields no rows: its count would be lost, so say so
        if R == 0 and dropped:
            print(f"[ingest] a batch of {len(batch['json'])} documents produced no rows; dropped: "
                  f"{json.dumps(dropped)}", flush=True)
        return out


def build_dataset(shard_dirs: list[str], tokenizer_path: str, seq_len: int, image_size: int, patch_size: int,
                  pack_docs: int, pack_actors: int):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # same seed + same shards -> same rows in the same order
    ctx.execution_options.preserve_order = True
    # one progress line per logging step comes from the loop; Ray Data's bars would interleave with it
    ctx.enable_progress_bars = False
    paths = [str(p) for d in shard_dirs for p in shard_paths(Path(d))]
    ds = ray.data.read_webdataset(paths, decoder=None, override_num_blocks=len(paths))
    ds = ds.map_batches(normalize_samples, batch_format="pandas")
    return ds.map_batches(
        PackDocuments,
        fn_constructor_kwargs=dict(tokenizer_path=tokenizer_path, seq_len=seq_len, image_size=image_size,
                                   patch_size=patch_size, pack_docs=pack_docs),
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pack_actors),
    )
