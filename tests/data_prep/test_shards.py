"""Shard format round trip, determinism and the manifest."""
import json
import tarfile

import pytest

from data_prep.cli import main as prep_main
from data_prep.demo_corpus import generate_corpus
from data_prep.reader import iter_documents, iter_samples
from data_prep.schema import Document, SchemaError, Segment, parse_document
from data_prep.shards import Manifest


def test_demo_command_writes_shards_manifest_and_tokenizer(tmp_path):
    out = tmp_path / "demo"
    assert prep_main(["demo", "--output", str(out), "--documents", "120", "--shard-docs", "50",
                      "--vocab-size", "600"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["inputs"] == manifest["documents"] == 120
    assert [s["name"] for s in manifest["shards"]] == [f"shard-00000{i}.tar" for i in range(3)]
    assert [s["documents"] for s in manifest["shards"]] == [50, 50, 20]
    assert sum(s["images"] for s in manifest["shards"]) == manifest["images"] > 0
    assert (out / "tokenizer.json").exists() and manifest["tokenizer"] == "tokenizer.json"
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            names = tar.getnames()
        keys = [n.split(".", 1)[0] for n in names]
        # members of one sample are contiguous (the WebDataset convention)
        assert len(set(keys)) == sum(1 for a, b in zip([None] + keys, keys) if a != b)


def test_round_trip_preserves_documents(tmp_path):
    out = tmp_path / "demo"
    prep_main(["demo", "--output", str(out), "--documents", "60", "--vocab-size", "0"])
    original = list(generate_corpus(seed=0, n_documents=60))
    read = list(iter_documents(out))
    assert [d.id for d in read] == [d.id for d in original]
    for a, b in zip(original, read):
        assert a.segments == b.segments
        assert a.images == b.images
        assert a.meta == b.meta


def test_same_input_gives_identical_shards(tmp_path):
    for name in ("a", "b"):
        prep_main(["demo", "--output", str(tmp_path / name), "--documents", "80", "--vocab-size", "300"])
    for f in ("shard-000000.tar", "tokenizer.json", "manifest.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_reader_rejects_documents_that_break_the_format():
    good = Document("doc-1", "t", [Segment("text", text="hi"), Segment("image", field="0000.png")],
                    {"0000.png": b"x"})
    sample = good.to_sample()
    assert parse_document(sample["json"], {"0000.png": b"x"}).segments == good.segments
    with pytest.raises(SchemaError, match="missing image"):
        parse_document(sample["json"], {})
    with pytest.raises(SchemaError, match="does not parse"):
        parse_document(b"{not json", {})
    body = json.loads(sample["json"])
    body["format_version"] = 99
    with pytest.raises(SchemaError, match="format_version"):
        parse_document(json.dumps(body), {"0000.png": b"x"})
    with pytest.raises(SchemaError, match="no dots"):
        Document("a.b", "t", [Segment("text", text="x")]).to_sample()


def test_unwritable_output_is_one_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert prep_main(["demo", "--output", str(blocker / "sub"), "--documents", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msa-prep: error:") and "not writable" in err and "Traceback" not in err


def test_manifest_read_names_a_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest"):
        Manifest.read(tmp_path)


def test_iter_samples_groups_members(tmp_path):
    out = tmp_path / "d"
    prep_main(["demo", "--output", str(out), "--documents", "10", "--vocab-size", "0"])
    samples = list(iter_samples(out / "shard-000000.tar"))
    assert len(samples) == 10 and all("json" in m for _, m in samples)
