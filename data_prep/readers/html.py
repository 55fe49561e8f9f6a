"""HTML pages with their images stored locally (how web-crawled interleaved corpora are built).

    msa-prep html INPUT_DIR --output OUT_DIR

Every `*.html` / `*.htm` / `*.xhtml` file under INPUT_DIR is one document (sorted by relative path;
symlinked directories are not followed). The readable text and the `<img>` elements are taken in
document order with the standard library's `html.parser`; `<script>`, `<style>`, `<nav>`, `<header>`,
`<footer>`, `<aside>`, `<form>`, `<noscript>`, `<template>`, `<svg>`, `<iframe>` and the `<head>` are
skipped (the `<title>` goes into meta). Block elements separate paragraphs; other whitespace collapses.
An image is `src` (or `data-src`, lazy loading) resolved relative to the page; `data:` URIs are
decoded; URLs are never fetched (`remote_image`); a path leaving INPUT_DIR is `outside_root`.

Encoding: a BOM, else `<meta charset>` in the first 4 KiB, else UTF-8; decoded strictly
(`bad_encoding` otherwise). A page with NUL characters or no markup at all is `bad_html`.
"""
from __future__ import annotations

import codecs
import os
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Iterator

from data_prep.raw import RawDoc, RawImage, RawText, image_from_data_uri
from data_prep.readers import MAX_TEXT_FILE_BYTES, Reader, chunks
from data_prep.safepath import is_inside, read_bounded, real_root, resolve_reference

PAGE_SUFFIXES = (".html", ".htm", ".xhtml")
SKIP_TAGS = {"script", "style", "noscript", "template", "nav", "header", "footer", "aside", "form", "svg",
             "iframe", "head", "button", "select", "textarea", "object", "canvas", "math"}
BLOCK_TAGS = {"p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol",
              "table", "tr", "td", "th", "blockquote", "pre", "figure", "figcaption", "br", "hr", "dl", "dt",
              "dd", "body", "html", "caption", "address", "details", "summary"}
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
             "track", "wbr"}
_BREAK = object()
_WS_RE = re.compile(r"\s+")
_CHARSET_RE = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?\s*([A-Za-z0-9_\-:.]+)", re.I)
# WHATWG: these labels mean windows-1252 in HTML
_CP1252_LABELS = {"iso-8859-1", "iso8859-1", "latin1", "latin-1", "l1", "us-ascii", "ascii", "cp819"}


class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.items: list = []  # str | _BREAK | ("img", src)
        self.skip: list[str] = []
        self.in_title = False
        self.title = ""
        self.tags = 0

    def handle_starttag(self, tag, attrs):
        self.tags += 1
        if tag == "title":
            self.in_title = True
        if tag in SKIP_TAGS and tag not in VOID_TAGS:
            self.skip.append(tag)
            return
        if self.skip:
            return
        if tag == "img":
            a = dict(attrs)
            src = a.get("src") or a.get("data-src") or ""
            self.items.append(("img", src))
        elif tag in BLOCK_TAGS:
            self.items.append(_BREAK)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag in SKIP_TAGS and tag not in VOID_TAGS and self.skip and self.skip[-1] == tag:
            self.skip.pop()

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in self.skip:
            while self.skip and self.skip.pop() != tag:
                pass
            return
        if not self.skip and tag in BLOCK_TAGS:
            self.items.append(_BREAK)

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        elif not self.skip:
            self.items.append(data)


def decode_page(data: bytes) -> str:
    """Bytes -> text by BOM, else <meta charset>, else UTF-8. Raises UnicodeDecodeError."""
    if data.startswith(codecs.BOM_UTF8):
        return data[3:].decode("utf-8")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    m = _CHARSET_RE.search(data[:4096])
    enc = m.group(1).decode("ascii").lower() if m else "utf-8"
    if enc in _CP1252_LABELS:
        enc = "cp1252"
    try:
        codecs.lookup(enc)
    except LookupError:
        enc = "utf-8"
    return data.decode(enc)


def extract(text: str) -> tuple[list, str] | None:
    """Page text -> (parts in order: str paragraphs-joined text | ("img", src), title); None: bad HTML."""
    if "\x00" in text:
        return None
    p = _PageParser()
    try:
        p.feed(text)
        p.close()
    except Exception:  # html.parser is lenient; anything it still raises means the page is not HTML
        return None
    if p.tags == 0:
        return None
    out: list = []
    paragraphs: list[str] = []
    current: list[str] = []

    def flush_paragraph():
        s = _WS_RE.sub(" ", "".join(current)).strip()
        current.clear()
        if s:
            paragraphs.append(s)

    def flush_text():
        flush_paragraph()
        if paragraphs:
            out.append("\n\n".join(paragraphs))
            paragraphs.clear()

    for item in p.items:
        if item is _BREAK:
            flush_paragraph()
        elif isinstance(item, tuple):
            flush_text()
            out.append(item)
        else:
            current.append(item)
    flush_text()
    return out, _WS_RE.sub(" ", p.title).strip()


@dataclass
class HtmlReader(Reader):
    input_dir: str
    name = "html"

    def describe(self) -> dict:
        return {"format": "html", "input": real_root(self.input_dir)}

    def _pages(self) -> list[str]:
        root = real_root(self.input_dir)
        found = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for f in filenames:
                if f.lower().endswith(PAGE_SUFFIXES):
                    found.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
        return sorted(found)

    def plan(self, unit_docs: int) -> list[dict]:
        root = real_root(self.input_dir)
        units = []
        for pages in chunks(self._pages(), unit_docs):
            stats = []
            for rel in pages:
                try:
                    st = os.stat(os.path.join(root, rel))
                    stats.append([rel, st.st_size, st.st_mtime_ns])
                except OSError:
                    stats.append([rel, -1, 0])
            units.append({"pages": stats, "n": len(pages)})
        return units

    def read(self, spec: dict) -> Iterator[RawDoc]:
        root = real_root(self.input_dir)
        for rel, _, _ in spec["pages"]:
            yield self._read_page(root, rel)

    def _read_page(self, root: str, rel: str) -> RawDoc:
        doc = RawDoc(input_id=rel, source="html", meta={"source_path": rel})
        logical = os.path.join(root, rel)
        if not is_inside(root, os.path.realpath(logical)):
            doc.error = "outside_root"
            return doc
        data, err = read_bounded(logical, MAX_TEXT_FILE_BYTES, too_large="file_too_large", missing="bad_file")
        if err:
            doc.error = err
            return doc
        try:
            text = decode_page(data)
        except UnicodeError:
            doc.error = "bad_encoding"
            return doc
        parsed = extract(text)
        if parsed is None:
            doc.error = "bad_html"
            return doc
        items, title = parsed
        if title:
            doc.meta["title"] = title
        base_dir = os.path.dirname(logical)
        for item in items:
            if isinstance(item, str):
                doc.parts.append(RawText(item))
                continue
            src = item[1]
            if src.strip().lower().startswith("data:"):
                doc.parts.append(image_from_data_uri(src.strip()))
                continue
            path, err = resolve_reference(root, base_dir, src, url_encoded=True)
            if err:
                doc.parts.append(RawImage(error=err, src=src[:512]))
                continue
            data, err = read_bounded(path, self.max_image_bytes)
            doc.parts.append(RawImage(data=data, error=err, src=os.path.relpath(path, root).replace(os.sep, "/")))
        return doc
