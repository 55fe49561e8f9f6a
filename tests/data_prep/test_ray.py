"""The Ray path: units and shards as Ray tasks give the same bytes as local processes, and the
training pipeline's Ray Data ingest streams the result. Each test starts and stops only its own Ray."""
import json

import numpy as np
import pytest

from data_prep.cli import main as prep_main
from prep_corpora import html_corpus, pairs_members, tree_bytes, write_tar

pytestmark = pytest.mark.slow
ARGS = ["--quiet", "--min-image-side", "16", "--shard-docs", "4"]


def test_private_local_ray_equals_local_processes(tmp_path):
    import ray

    if ray.is_initialized():
        pytest.skip("another test left this process connected to a Ray; `local` would reuse it")
    inp = html_corpus(tmp_path / "web", n_pages=10)
    assert prep_main(["html", str(inp), "--output", str(tmp_path / "seq"), "--workers", "1", *ARGS]) == 0
    # `local`: the command starts a Ray of its own (2 CPUs) and shuts it down when done
    assert prep_main(["html", str(inp), "--output", str(tmp_path / "ray"), "--ray-address", "local",
                      "--workers", "2", *ARGS]) == 0
    assert not ray.is_initialized()
    assert tree_bytes(tmp_path / "seq") == tree_bytes(tmp_path / "ray")


def test_ray_job_output_streams_through_the_pipeline_ingest(local_ray, tmp_path):
    from pipeline.data import build_simple_dataset

    inp = tmp_path / "pairs"
    write_tar(inp / "000.tar", pairs_members(6, start=0))
    write_tar(inp / "001.tar", pairs_members(6, start=6))
    assert prep_main(["pairs", str(inp), "--output", str(tmp_path / "seq"), "--workers", "1", *ARGS]) == 0
    # inside a Ray job (this process is connected): the conversion uses that connection
    assert prep_main(["pairs", str(inp), "--output", str(tmp_path / "ray"), "--ray-address", "auto", *ARGS,
                      "--vocab-size", "300"]) == 0
    assert local_ray.is_initialized()
    out = tmp_path / "ray"
    seq = tree_bytes(tmp_path / "seq")
    got = tree_bytes(out)
    assert {k: v for k, v in got.items() if k.startswith("shard-")} == {k: v for k, v in seq.items()
                                                                       if k.startswith("shard-")}
    manifest = json.loads(got["manifest.json"])
    assert manifest["documents"] == 12 and [s["documents"] for s in manifest["shards"]] == [4, 4, 4]

    ds = build_simple_dataset([str(out)], str(out / "tokenizer.json"), 256, 16, 8, pack_docs=4, pack_actors=1)
    rows = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    cols = {k: np.concatenate([b[k] for b in rows]) for k in rows[0]}
    assert int(cols["n_images"].sum()) == 12
    assert all(int(cols[c].sum()) == 0 for c in cols if c.startswith("dropped_"))
