"""`msa-prep pairs`: img2dataset tars and folders -> image-then-caption documents; bad samples counted."""
import os
import tarfile

from data_prep.reader import iter_documents
from prep_corpora import (bomb_png, image_bytes, pairs_members, pipeline_reads, prep_converter, truncated, write,
                          write_tar)

convert = prep_converter("pairs", "--min-text-chars", "5")


def test_tars_and_folders_round_trip(tmp_path):
    inp = tmp_path / "pairs"
    write_tar(inp / "00000.tar", pairs_members(5, start=0))
    write_tar(inp / "00001.tar", pairs_members(4, start=5))
    for name, data in pairs_members(3, start=9):  # the "files" output format of img2dataset
        write(inp / "00002" / name, data)
    write(inp / "00002_stats.json", b'{"count": 3}')  # not a sample
    m = convert(inp, tmp_path / "out", "--shard-docs", "4")
    assert m["inputs"] == m["documents"] == 12 and m["images"] == 12 and m["rejected"] == {}
    assert [s["documents"] for s in m["shards"]] == [4, 4, 4]
    docs = list(iter_documents(tmp_path / "out"))
    assert [d.meta["source_path"] for d in docs[:2]] == ["00000.tar:000000000", "00000.tar:000000001"]
    assert docs[-1].meta["source_path"] == "00002/000000011"
    for d in docs:
        assert [s.type for s in d.segments] == ["image", "text"] and d.source == "pairs"
        assert d.meta["url"].startswith("https://img.example/") and d.meta["images"][0]["orig_size"] == [80, 64]
    read = pipeline_reads(tmp_path / "out")
    assert read["documents"] == 12 and read["images"] == 12
    # one tar as the input
    m1 = convert(inp / "00001.tar", tmp_path / "one")
    assert m1["documents"] == 4


def test_bad_pairs_are_rejected_with_the_reason_of_their_image(tmp_path):
    inp = tmp_path / "pairs"
    cap = b"a caption of enough length"
    good = image_bytes(80, 64, 1, "JPEG")
    members = [
        ("a.jpg", good), ("a.txt", cap),
        ("b.jpg", truncated(image_bytes(300, 200, 2, "JPEG"))), ("b.txt", cap),
        ("c.jpg", b"<html>not an image</html>"), ("c.txt", cap),
        ("d.jpg", b""), ("d.txt", cap),
        ("e.png", bomb_png(30000)), ("e.txt", cap),
        ("f.txt", cap),                                        # no image at all
        ("g.jpg", image_bytes(80, 64, 3, "JPEG")), ("g.txt", "caf\xe9".encode("latin-1") + b" caption"),
        ("h.jpg", image_bytes(80, 64, 4, "JPEG")), ("h.txt", b""),  # empty caption
        ("i.jpg", good), ("i.txt", b"another caption, same image"),  # duplicate image
        ("j.jpg", good), ("j.txt", cap),                        # duplicate document
    ]
    write_tar(inp / "000.tar", members)
    write(inp / "001.tar", b"")
    broken = write_tar(tmp_path / "tmp.tar", pairs_members(3, seed=5))
    with tarfile.open(broken) as tar:
        cut = tar.getmembers()[3].offset_data + 100  # inside the second sample's image
    write(inp / "002.tar", broken.read_bytes()[:cut])
    write(tmp_path / "outside.jpg", image_bytes(80, 64, 6, "JPEG"))
    write(inp / "loose" / "k.txt", cap)
    os.symlink(tmp_path / "outside.jpg", inp / "loose" / "k.jpg")
    m = convert(inp, tmp_path / "out")
    assert m["rejected"] == {"bad_encoding": 1, "bad_file": 2, "bad_image": 1, "duplicate_document": 1,
                             "duplicate_image": 1, "empty_file": 2, "image_too_large": 1, "missing_image": 1,
                             "not_an_image": 1, "outside_root": 1, "text_too_short": 1}
    assert m["images_rejected"] == {"bad_image": 1, "duplicate_image": 1, "empty_file": 1, "image_too_large": 1,
                                    "missing_image": 1, "not_an_image": 1, "outside_root": 1}
    assert m["documents"] == 2  # a, and the first sample of the truncated tar
    assert m["inputs"] == m["documents"] + sum(m["rejected"].values())
    assert {d.meta["source_path"] for d in iter_documents(tmp_path / "out")} == {"000.tar:a", "002.tar:000000000"}
