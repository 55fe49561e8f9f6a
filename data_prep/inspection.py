"""`msa-prep inspect` (named inspection.py: a module `inspect` would shadow the standard library's): a shard directory's stats, and a self-contained HTML preview of a few documents.

    msa-prep inspect /tmp/demo --output /tmp/demo-preview.html --documents 8

The preview has no external references: images are inline base64 thumbnails (at most 256 px), text
is escaped, answer spans are highlighted; open it in any browser.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from PIL import Image

from data_prep.reader import iter_documents
from data_prep.shards import Manifest

THUMB = 256


def stats_lines(m: Manifest) -> list[str]:
    total_bytes = sum(s.get("bytes", 0) for s in m.shards)
    lines = [
        f"created by:   {m.created_by} (format version {m.format_version})",
        f"inputs:       {m.inputs}",
        f"documents:    {m.documents}",
        f"images:       {m.images}",
        f"shards:       {len(m.shards)} ({total_bytes / 2**20:.1f} MiB)",
        f"est. tokens:  {m.est_tokens or sum(s.get('est_tokens', 0) for s in m.shards)} (text only)",
        f"rejected:     {sum(m.rejected.values())}" + "".join(f"\n  {k:<20}{v}" for k, v in sorted(m.rejected.items())),
    ]
    if m.images_rejected:
        lines.append(f"images rejected: {sum(m.images_rejected.values())}"
                     + "".join(f"\n  {k:<20}{v}" for k, v in sorted(m.images_rejected.items())))
    lines.append(f"tokenizer:    {m.tokenizer or '(none)'}")
    return lines


def _thumbnail(data: bytes) -> tuple[str, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        size = im.size
        im = im.convert("RGB")
        im.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), size


def render_html(manifest: Manifest, docs: list, title: str) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
        ".doc{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1.5em 0}"
        ".meta{font:12px monospace;color:#666;white-space:pre-wrap;word-break:break-all}"
        ".t{white-space:pre-wrap}.answer{background:#ffe58a}figure{display:inline-block;margin:.5em}"
        "figcaption{font:11px monospace;color:#666}pre.stats{background:#f6f6f6;padding:1em}</style>",
        "</head><body>", f"<h1>{esc(title)}</h1>", f'<pre class="stats">{esc(chr(10).join(stats_lines(manifest)))}</pre>',
    ]
    for doc in docs:
        out.append(f'<div class="doc"><h3>{esc(doc.id)}</h3>')
        out.append(f'<div class="meta">source: {esc(doc.source)}  meta: '
                   f'{esc(json.dumps(doc.meta, ensure_ascii=False)[:600])}</div>')
        for seg in doc.segments:
            if seg.type == "text":
                cls = "t answer" if seg.role == "answer" else "t"
                out.append(f'<span class="{cls}">{esc(seg.text)}</span>')
            else:
                src, (w, h) = _thumbnail(doc.images[seg.field])
                out.append(f'<figure><img src="{src}" alt="{esc(seg.field)}">'
                           f"<figcaption>{esc(seg.field)} {w}x{h}</figcaption></figure>")
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def inspect_shards(shards_dir: Path, output: Path | None, n_documents: int) -> int:
    m = Manifest.read(shards_dir)
    print(f"{shards_dir}")
    print("\n".join(stats_lines(m)))
    docs = list(iter_documents(shards_dir, limit=n_documents)) if n_documents > 0 and m.shards else []
    output = Path(output) if output else Path(shards_dir) / "preview.html"
    output.write_text(render_html(m, docs, f"msa-prep preview: {shards_dir.name}"), encoding="utf-8")
    print(f"preview of {len(docs)} documents: {output.resolve()} (open it in a browser)")
    return 0
