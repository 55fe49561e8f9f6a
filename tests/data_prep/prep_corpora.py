"""Small corpora of every input format, written into a test's tmp_path (nothing is committed or
fetched), and the helpers the data_prep tests share (imported by them; fixtures are in conftest.py)."""
from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

# What the conversion tests pass to every command: one worker, quiet, small images allowed.
PREP_ARGS = ("--workers", "1", "--quiet", "--min-image-side", "16")


def prep_converter(command: str, *options: str) -> Callable[..., dict]:
    """`convert(inp, out, *extra)` for one `msa-prep` command: runs it with PREP_ARGS, `options` and
    `extra`, asserts that it succeeded and returns the manifest."""
    def convert(inp, out, *extra) -> dict:
        from data_prep.cli import main as prep_main

        assert prep_main([command, str(inp), "--output", str(out), *PREP_ARGS, *options, *extra]) == 0
        return json.loads((Path(out) / "manifest.json").read_text())
    return convert

WORDS = ("river stone lantern meadow copper harbor violet engine maple signal orbit canyon ember "
         "glacier willow bridge falcon quartz tundra marble").split()


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def image_bytes(w: int, h: int, seed: int, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A small picture that differs per seed (so dedup only merges what a test means to merge)."""
    rng = random.Random(seed)
    im = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        d.rectangle((x0, y0, x0 + rng.randrange(1, w), y0 + rng.randrange(1, h)),
                    fill=tuple(rng.randrange(256) for _ in range(3)))
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def bomb_png(side: int = 30000) -> bytes:
    """A tiny PNG that claims side x side pixels (a decompression bomb): only the header matters."""
    im = Image.new("1", (side, side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def page(body: str, title: str = "A page", head_extra: str = "") -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>{head_extra}"
            f"<style>p {{color: red}}</style><script>var x = 'script text';</script></head>"
            f"<body><nav><a href='/'>Home</a> <img src='img/logo.png'></nav>{body}"
            f"<footer>Copyright footer text</footer></body></html>")


def html_corpus(root: Path, n_pages: int = 12, seed: int = 0) -> Path:
    """n good pages in two folders, each with text and 1-2 local images (one referenced with ../)."""
    rng = random.Random(seed)
    write(root / "img" / "logo.png", image_bytes(64, 64, 999))
    for i in range(n_pages):
        sub = "a" if i % 2 == 0 else "b/deep"
        rel_img = "../img" if sub == "a" else "../../img"
        write(root / "img" / f"p{i}.jpg", image_bytes(96, 72, seed * 1000 + i, "JPEG"))
        write(root / sub / "pics" / f"q{i}.png", image_bytes(80, 80, seed * 1000 + 500 + i))
        body = (f"<article><h1>Title {i}</h1><p>{sentence(rng)}</p>"
                f"<img src='{rel_img}/p{i}.jpg' alt='a photo'><p>{sentence(rng)} &amp; more</p>"
                f"<div><img src='pics/q{i}.png'></div><p>{sentence(rng)}</p></article>")
        write(root / sub / f"page{i:03d}.html", page(body, title=f"Page {i}"))
    return root


def obelics_records(root: Path, n: int = 10, seed: int = 0, image_dir: str = "images") -> list[dict]:
    """Records with texts[]/images[]: images as paths (under root/image_dir) and as bytes."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        p = f"{image_dir}/r{i}.png"
        write(root / p, image_bytes(72, 60, seed * 1000 + i))
        texts = [sentence(rng), None, sentence(rng), sentence(rng), None]
        images = [None, f"r{i}.png" if image_dir else p, None, None,
                  {"bytes": image_bytes(64, 64, seed * 1000 + 700 + i, "JPEG"), "path": None}]
        recs.append({"texts": texts, "images": images, "url": f"https://example.org/{i}", "id": f"rec{i}"})
    return recs


def to_jsonl(recs: list[dict]) -> str:
    import base64

    def conv(v):
        if isinstance(v, dict) and isinstance(v.get("bytes"), bytes):
            return {"bytes": base64.b64encode(v["bytes"]).decode(), "path": v.get("path")}
        return v

    return "".join(json.dumps({**r, "images": [conv(x) for x in r["images"]]}) + "\n" for r in recs)


def to_parquet(recs: list[dict], path: Path, row_group_size: int = 4) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [[None if x is None else ({"bytes": None, "path": x} if isinstance(x, str) else x) for x in r["images"]]
              for r in recs]
    table = pa.table({
        "texts": pa.array([r["texts"] for r in recs], pa.list_(pa.string())),
        "images": pa.array(images, pa.list_(img_type)),
        "url": pa.array([r["url"] for r in recs]),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def pairs_members(n: int, seed: int = 0, start: int = 0) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(start, start + n):
        key = f"{i:09d}"
        out.append((f"{key}.jpg", image_bytes(80, 64, seed * 1000 + i, "JPEG")))
        out.append((f"{key}.txt", sentence(rng, 8).encode()))
        out.append((f"{key}.json", json.dumps({"key": key, "url": f"https://img.example/{i}.jpg",
                                               "caption": "unused"}).encode()))
    return out


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every visible file of an output directory (shards, manifest), for byte-for-byte comparisons."""
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir()) if p.is_file() and not p.name.startswith(".")}


def pipeline_reads(out: Path, vocab_size: int = 300) -> dict:
    """Read the shards back the way training does: parse, tokenize, decode images, pack. Returns counts."""
    from data_prep.reader import iter_documents
    from data_prep.tokenizer import load_tokenizer, train_tokenizer_on_shards
    from pipeline.packing import ImageDecoder, PackSpec, Tokenizer, pack_documents

    tok_path = train_tokenizer_on_shards(out, vocab_size, Path(out) / ".test-tokenizer.json")
    tok = Tokenizer(load_tokenizer(tok_path))
    docs = list(iter_documents(out))
    spec = PackSpec(seq_len=512, image_size=16, patch_size=8)
    dropped: dict = {}
    cols = pack_documents(docs, tok, spec, ImageDecoder(spec.image_size), dropped)
    tok_path.unlink()
    assert dropped == {}, dropped
    return {"documents": len(docs), "rows": len(cols["tokens"]), "images": int(cols["n_images"].sum())}
