"""`msa-prep inspect`: stats on stdout and a self-contained HTML preview that parses and shows the images."""
import base64
import io
from html.parser import HTMLParser

from PIL import Image

from data_prep.cli import main as prep_main
from prep_corpora import html_corpus, prep_converter


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.docs, self.imgs, self.external, self.text = 0, [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("class") == "doc":
            self.docs += 1
        if tag == "img":
            self.imgs.append(a["src"])
        for k in ("src", "href"):
            if k in a and not a[k].startswith("data:"):
                self.external.append(a[k])

    def handle_data(self, data):
        self.text.append(data)


def test_inspect_prints_stats_and_writes_a_self_contained_preview(tmp_path, capsys):
    inp = html_corpus(tmp_path / "web", n_pages=6)
    out = tmp_path / "out"
    prep_converter("html")(inp, out)
    capsys.readouterr()
    preview = tmp_path / "preview.html"
    assert prep_main(["inspect", str(out), "--output", str(preview), "--documents", "3"]) == 0
    printed = capsys.readouterr().out
    assert "documents:    6" in printed and "images:       12" in printed and str(preview) in printed
    p = _Collect()
    p.feed(preview.read_text(encoding="utf-8"))
    p.close()
    assert p.docs == 3 and len(p.imgs) == 6 and p.external == []
    for src in p.imgs:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.load()
            assert max(im.size) <= 256
    assert any("Title 0" in t for t in p.text)
    # the default path is inside the shard directory; a non-HTML output is refused in one line
    assert prep_main(["inspect", str(out)]) == 0 and (out / "preview.html").exists()
    assert prep_main(["inspect", str(out), "--output", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("msa-prep: error:")
