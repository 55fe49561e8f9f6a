"""The ingest's reader and packer on damaged shards, without Ray: every document that cannot be used
is counted under its reason, the data position covers it, ids stay unique, and a resumed packer leaves
out exactly what was consumed."""
import io
import tarfile

import numpy as np
import pytest

from data_prep.cli import main as prep_main
from pipeline.data import DROP_REASONS, PackDocuments, read_shard


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dmg") / "shards"
    assert prep_main(["demo", "--output", str(out), "--documents", "24", "--max-chars", "2000", "--shard-docs", "24",
                      "--vocab-size", "1024", "--quiet"]) == 0
    return out


def _members(path):
    with tarfile.open(path) as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar]


def _write(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _run(path, expected, done=None):
    packer = PackDocuments(str(path.parent / "tokenizer.json"), 1024, 32, 8, pack_docs=8, done_ids=done)
    parts = [packer({k: b[k].to_numpy() for k in b.columns}) for b in read_shard(str(path), 0, expected, chunk=8)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _counts(out):
    return {r: int(out[f"dropped_{r}"].sum()) for r in DROP_REASONS if out[f"dropped_{r}"].sum()}


def _ids(out):
    ids = [int(x) for x in out["piece_ids"].ravel() if x]
    assert len(ids) == len(set(ids)), "an id appears twice"
    return set(ids)


def test_clean_shard_counts_every_document_once(shard_dir):
    out = _run(shard_dir / "shard-000000.tar", 24)
    assert _counts(out) == {}
    assert int(out["docs_done"].sum()) == 24
    _ids(out)


def test_damage_is_skipped_and_counted_by_reason(shard_dir, tmp_path):
    members = _members(shard_dir / "shard-000000.tar")
    keys = sorted({n.split(".", 1)[0] for n, _ in members})
    damaged = []
    for name, data in members:
        key, field = name.split(".", 1)
        if key == keys[1] and field == "json":
            data = b"{not json"
        if key == keys[2] and field.endswith("png"):
            data = b"\x89PNG" + bytes(40)
        if key == keys[3] and field == "json":
            continue  # a sample without its text
        if key == keys[4] and field == "json":
            damaged.append(("/abs/evil.json", b"{}"))  # an unsafe member: a sample of its own
        damaged.append((name, data))
    damaged += [(n, d) for n, d in members if n.startswith(keys[5] + ".")]  # a key seen twice
    path = tmp_path / "shard-000000.tar"
    _write(path, damaged)
    (tmp_path / "tokenizer.json").write_bytes((shard_dir / "tokenizer.json").read_bytes())
    out = _run(path, 24)
    assert _counts(out) == {"bad_json": 1, "bad_image": 1, "missing_json": 1, "unsafe_member": 1}
    # every sample read is accounted for in the data position (the repeated key counts as a document)
    assert int(out["docs_done"].sum()) == 26
    _ids(out)

    # truncated: what was read is used, the rest is one loss row with the number of documents lost
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    out = _run(path, 24)
    lost = _counts(out).get("truncated_shard", 0)
    assert lost > 0 and int(out["docs_done"].sum()) == 24  # read + dropped + lost = the manifest's count
    _ids(out)


def test_missing_shard_is_one_counted_loss(tmp_path, shard_dir):
    (tmp_path / "tokenizer.json").write_bytes((shard_dir / "tokenizer.json").read_bytes())
    out = _run(tmp_path / "gone.tar", 24)
    assert _counts(out) == {"missing_shard": 24}
    assert len(out["tokens"]) == 1 and (out["segment_ids"] == 0).all()  # a padding row carries the count
    assert int(out["docs_done"].sum()) == 24


def test_resumed_packer_leaves_out_what_was_consumed(shard_dir):
    full = _run(shard_dir / "shard-000000.tar", 24)
    first_rows = full["piece_ids"][:3]
    done = {0: sorted(int(x) for x in first_rows.ravel() if x)}
    rest = _run(shard_dir / "shard-000000.tar", 24, done=done)
    assert _ids(rest) == _ids(full) - set(done[0])
    assert int(rest["docs_done"].sum()) == 24 - int(full["docs_done"][:3].sum())
