"""The Ray Data ingest against the plain local packer: same documents in, same rows out."""
import numpy as np
import pytest

from data_prep.reader import iter_documents
from data_prep.tokenizer import load_tokenizer
from pipeline.packing import ImageDecoder, PackSpec, Tokenizer, pack_documents

pytestmark = pytest.mark.slow


def test_ray_ingest_equals_local_packing(local_ray, demo_shards):
    from pipeline.data import build_simple_dataset

    spec = PackSpec(seq_len=512, image_size=16, patch_size=8)
    pack_docs = 25  # divides the 100-document shards: packing groups never cross a shard
    ds = build_simple_dataset([str(demo_shards)], str(demo_shards / "tokenizer.json"), spec.seq_len, spec.image_size,
                       spec.patch_size, pack_docs=pack_docs, pack_actors=1)
    rows = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    got = {k: np.concatenate([b[k] for b in rows]) for k in rows[0]}

    tok = Tokenizer(load_tokenizer(demo_shards))
    docs = list(iter_documents(demo_shards))
    parts = [pack_documents(docs[i:i + pack_docs], tok, spec, ImageDecoder(spec.image_size))
             for i in range(0, len(docs), pack_docs)]
    want = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert all(got[f"dropped_{r}"].sum() == 0 for r in ("bad_image", "bad_json", "no_text"))
    # every document is accounted for in the data position, shard by shard
    manifest_docs = [100, 100, 100, 100]
    assert [int(got["docs_done"][got["plan_idx"] == i].sum()) for i in range(4)] == manifest_docs
    # the dataset carries the context the pipeline set: ordered, no progress bars, and no repeating
    # high-memory warning for the fixed pool of pack actors
    ctx = ds.context
    assert ctx.execution_options.preserve_order and not ctx.enable_progress_bars
    assert ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s == -1


def test_ray_train_splits_the_stream_in_plan_order_whatever_the_process_context_says():
    # Ray Train gives the training dataset the execution options of the process that splits it; msa-train
    # hands it its own, ordered ones (a process whose context was never set would deliver rows as the
    # packing actor's tasks finish)
    import ray.data

    from pipeline.data import ingest_config

    ctx = ray.data.DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = False
    try:
        options = ingest_config()._resolve_execution_options("train")
    finally:
        ctx.execution_options.preserve_order = old
    assert options.preserve_order
