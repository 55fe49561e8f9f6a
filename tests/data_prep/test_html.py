"""`msa-prep html`: pages with local images -> shards the pipeline reads; every bad input counted."""
import os

from data_prep.cli import main as prep_main
from data_prep.reader import iter_documents
from data_prep.readers.html import extract
from prep_corpora import (bomb_png, html_corpus, image_bytes, page, pipeline_reads, prep_converter, truncated,
                          write)

convert = prep_converter("html")


def test_extracts_text_and_images_in_document_order():
    items, title = extract(page(
        "<h1>Head line</h1><p>First   para\n with <b>bold</b> words.</p><img src='a.png'>"
        "<aside>side note</aside><p>Second &lt;para&gt;</p><noscript>x</noscript><img data-src='b.jpg'>"
        "<form><button>Send</button></form>", title="T &amp; t"))
    assert title == "T & t"
    assert items == ["Head line\n\nFirst para with bold words.", ("img", "a.png"), "Second <para>", ("img", "b.jpg")]


def test_round_trip_into_shards_the_pipeline_reads(tmp_path):
    inp = html_corpus(tmp_path / "web", n_pages=12)
    m = convert(inp, tmp_path / "out", "--shard-docs", "5")
    assert m["inputs"] == m["documents"] == 12 and m["rejected"] == {} and m["images_rejected"] == {}
    assert m["images"] == 24 and [s["documents"] for s in m["shards"]] == [5, 5, 2]
    assert all(s["est_tokens"] > 0 for s in m["shards"]) and m["created_by"] == "msa-prep html"
    docs = list(iter_documents(tmp_path / "out"))
    first = docs[0]
    assert first.meta["source_path"] == "a/page000.html" and first.meta["title"] == "Page 0"
    assert [s.type for s in first.segments] == ["text", "image", "text", "image", "text"]
    assert [im["src"] for im in first.meta["images"]] == ["img/p0.jpg", "a/pics/q0.png"]
    text = " ".join(s.text for d in docs for s in d.segments if s.type == "text")
    for skipped in ("script text", "Home", "Copyright footer", "color: red"):
        assert skipped not in text
    read = pipeline_reads(tmp_path / "out")
    assert read["documents"] == 12 and read["images"] == 24 and read["rows"] > 0


def test_every_bad_input_is_skipped_counted_and_accounted_for(tmp_path):
    inp = html_corpus(tmp_path / "web", n_pages=2)
    secret = write(tmp_path / "secret.png", image_bytes(64, 64, 42))
    good = "<p>" + "Readable words of a page. " * 3 + "</p>"
    w = lambda name, body: write(inp / "bad" / name, page(body))  # noqa: E731
    write(inp / "bad" / "corrupt.jpg", truncated(image_bytes(300, 200, 1, "JPEG")))
    write(inp / "bad" / "notimg.png", b"hello, I am text")
    write(inp / "bad" / "zero.png", b"")
    write(inp / "bad" / "bomb.png", bomb_png(30000))
    write(inp / "bad" / "tiny.png", image_bytes(4, 4, 2))
    write(inp / "bad" / "wide.png", image_bytes(200, 20, 3))
    os.symlink(secret, inp / "bad" / "link.png")
    w("images.html", good + "".join(f"<img src='{s}'>" for s in (
        "corrupt.jpg", "notimg.png", "zero.png", "bomb.png", "tiny.png", "wide.png", "nothere.png",
        "../../secret.png", "/etc/passwd", "link.png", "https://example.com/x.jpg", "//cdn.example/y.png",
        "file:///etc/hosts", "data:image/png;base64,!!!notbase64")))
    write(inp / "bad" / "latin1.html", "<p>caf\xe9 ol\xe9 in latin-1 without a declaration</p>".encode("latin-1"))
    write(inp / "bad" / "declared.html", "<meta charset='iso-8859-1'><p>caf\xe9 declared, so it decodes fine</p>"
          .encode("latin-1"))
    write(inp / "bad" / "binary.html", "\x00\x01\x02 <p>binary junk</p>")
    write(inp / "bad" / "notags.html", "just some words without any markup at all")
    write(inp / "bad" / "zero.html", b"")
    w("short.html", "<p>Hi.</p>")
    w("nothing.html", "")
    write(inp / "a" / "zz_copy.html", (inp / "a" / "page000.html").read_bytes())  # same content, later file
    outside = write(tmp_path / "outside.html", page(good))
    os.symlink(outside, inp / "bad" / "escape.html")

    m = convert(inp, tmp_path / "out")
    assert m["rejected"] == {"bad_encoding": 1, "bad_html": 2, "duplicate_document": 1, "empty_document": 1,
                             "empty_file": 1, "outside_root": 1, "text_too_short": 1}
    assert m["images_rejected"] == {"bad_image": 2, "empty_file": 1, "image_too_large": 1, "image_too_small": 1,
                                    "bad_aspect": 1, "missing_image": 1, "not_an_image": 1, "outside_root": 4,
                                    "remote_image": 2}
    assert m["inputs"] == 12 and m["documents"] == 4  # 2 good, images.html (text kept), declared.html
    assert m["inputs"] == m["documents"] + sum(m["rejected"].values())
    docs = {d.meta["source_path"]: d for d in iter_documents(tmp_path / "out")}
    assert "café declared" in docs["bad/declared.html"].segments[0].text
    assert docs["bad/images.html"].images == {}
    pipeline_reads(tmp_path / "out")


def test_unreadable_input_and_unwritable_output_are_one_clear_error(tmp_path, capsys):
    assert prep_main(["html", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msa-prep: error:") and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert prep_main(["html", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "no input documents" in capsys.readouterr().err
    inp = html_corpus(tmp_path / "web", n_pages=1)
    blocker = write(tmp_path / "file", b"")
    assert prep_main(["html", str(inp), "--output", str(blocker / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err
    assert prep_main(["html", str(inp), "--output", str(inp / "out")]) == 2
    assert "inside the input" in capsys.readouterr().err
