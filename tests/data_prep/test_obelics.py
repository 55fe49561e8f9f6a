"""`msa-prep obelics`: parquet and JSONL records (texts[]/images[]) -> shards; bad records counted."""
import json

from data_prep.cli import main as prep_main
from data_prep.reader import iter_documents
from prep_corpora import (image_bytes, obelics_records, pipeline_reads, prep_converter, to_jsonl, to_parquet,
                          tree_bytes, truncated, write)

convert = prep_converter("obelics")


def test_parquet_and_jsonl_give_the_same_documents(tmp_path):
    recs = obelics_records(tmp_path / "data", n=10)
    to_parquet(recs, tmp_path / "data" / "p" / "docs.parquet", row_group_size=3)
    write(tmp_path / "data" / "j" / "docs.jsonl", to_jsonl(recs))
    root = ["--image-root", str(tmp_path / "data" / "images")]
    mp = convert(tmp_path / "data" / "p" / "docs.parquet", tmp_path / "outp", *root, "--shard-docs", "4")
    mj = convert(tmp_path / "data" / "j" / "docs.jsonl", tmp_path / "outj", *root, "--shard-docs", "4")
    for m in (mp, mj):
        assert m["inputs"] == m["documents"] == 10 and m["images"] == 20 and m["rejected"] == {}
        assert [s["documents"] for s in m["shards"]] == [4, 4, 2]
    dp, dj = list(iter_documents(tmp_path / "outp")), list(iter_documents(tmp_path / "outj"))
    assert [d.segments for d in dp] == [d.segments for d in dj]
    assert [d.images for d in dp] == [d.images for d in dj]
    d = dp[3]
    assert [s.type for s in d.segments] == ["text", "image", "text", "image"]
    assert "\n\n" in d.segments[2].text  # two consecutive texts, one paragraph each
    assert d.meta["url"] == "https://example.org/3" and d.meta["row"] == 3
    assert d.meta["images"][0]["src"] == "r3.png"
    read = pipeline_reads(tmp_path / "outp")
    assert read["documents"] == 10 and read["images"] == 20


def test_bad_records_and_images_are_counted(tmp_path):
    data = tmp_path / "data"
    write(data / "images" / "ok.png", image_bytes(64, 64, 1))
    write(data / "images" / "trunc.jpg", truncated(image_bytes(200, 200, 2, "JPEG")))
    write(data / "images" / "zero.png", b"")
    write(tmp_path / "secret.png", image_bytes(64, 64, 3))
    text = "A paragraph with enough words in it."
    ok = {"texts": [text, None], "images": [None, "ok.png"]}
    lines = [
        json.dumps(ok),
        json.dumps({"texts": [text, None, None, None, None, None],
                    "images": [None, "trunc.jpg", "zero.png", "../secret.png", "/etc/passwd", "missing.png"]}),
        json.dumps({"texts": [text + " Remote.", None], "images": [None, "https://example.com/a.jpg"]}),
        json.dumps({"texts": [text], "images": []}),                 # lists of different lengths
        json.dumps({"texts": [text, "both"], "images": [None, "ok.png"]}),  # a position with both
        json.dumps({"texts": [None], "images": [None]}),             # a position with neither
        json.dumps({"images": ["ok.png"]}),                          # no texts
        "{not json",
        '"just a string"',
        "",                                                          # blank lines are not records
        json.dumps({"texts": ["Hi", None], "images": [None, "ok.png"]}),
        json.dumps(ok),                                              # a duplicate document
    ]
    raw = "\n".join(lines).encode() + b"\n" + '{"texts": ["caf\xe9 in latin-1 bytes"], "images": [null]}\n'.encode(
        "latin-1")
    write(data / "a.jsonl", raw)
    write(data / "b.jsonl", b"")
    write(data / "c.parquet", b"PAR1 this is not really parquet")
    m = convert(data, tmp_path / "out", "--image-root", str(data / "images"), "--shard-docs", "3")
    assert m["rejected"] == {"bad_encoding": 1, "bad_file": 1, "bad_record": 6, "duplicate_document": 1,
                             "empty_file": 1, "text_too_short": 1}
    assert m["images_rejected"] == {"bad_image": 1, "empty_file": 1, "missing_image": 1, "outside_root": 2,
                                    "remote_image": 1}
    assert m["documents"] == 3 and m["inputs"] == 3 + sum(m["rejected"].values()) == 14
    pipeline_reads(tmp_path / "out")


def test_same_input_same_bytes_and_workers_do_not_matter(tmp_path):
    recs = obelics_records(tmp_path / "data", n=9)
    recs += recs[:2]  # duplicates across units
    write(tmp_path / "data" / "docs.jsonl", to_jsonl(recs))
    root = ["--image-root", str(tmp_path / "data" / "images"), "--shard-docs", "2", "--shard-size-mb", "0.01"]
    convert(tmp_path / "data" / "docs.jsonl", tmp_path / "a", *root)
    convert(tmp_path / "data" / "docs.jsonl", tmp_path / "b", *root)
    assert prep_main(["obelics", str(tmp_path / "data" / "docs.jsonl"), "--output", str(tmp_path / "c"), "--quiet",
                      "--min-image-side", "16", "--workers", "2", *root]) == 0
    a = tree_bytes(tmp_path / "a")
    assert a == tree_bytes(tmp_path / "b") == tree_bytes(tmp_path / "c")
    m = json.loads(a["manifest.json"])
    assert m["rejected"] == {"duplicate_document": 2} and m["documents"] == 9
