"""What a reader hands to the normalizer: raw input documents, and the reasons things are rejected.

Every format reader (`data_prep/readers/`) turns its input into `RawDoc`s, one per input document, in
a fixed order. A reader never raises for bad input: a document it cannot read at all carries a
document-level `error`; an image it cannot fetch carries an image-level `error`. The normalizer
(`data_prep/normalize.py`) does the rest.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

# Reasons are stable snake_case strings: they are manifest keys that users grep and dashboards plot.
# Document-level: counted in manifest `rejected` (one per rejected input document).
DOC_REASONS = (
    "bad_encoding",        # text is not valid in its declared/assumed encoding (UTF-8 unless declared)
    "bad_html",            # a page that does not parse as HTML (binary data, no markup)
    "bad_record",          # an OBELICS record that breaks the texts[]/images[] contract, or bad JSON
    "bad_file",            # an input file that cannot be opened or read to its end (corrupt parquet/tar)
    "empty_file",          # a zero-byte input file (page, record file, tar, or a pair's only image)
    "file_too_large",      # a page or caption above the size limit
    "outside_root",        # the input file itself resolves outside the input directory (symlink)
    "text_too_short",      # less text than --min-text-chars (after stripping whitespace)
    "empty_document",      # nothing usable left: no text and no image
    "duplicate_document",  # same content (text + image hashes) as an earlier document
    "processing_error",    # an unexpected exception while processing this document (a bug: reported)
)
# Image-level: counted in manifest `images_rejected` (one per dropped image reference). A pair
# (image-caption) document needs its image: when it loses it, the document is rejected too, under
# the image's reason.
IMAGE_REASONS = (
    "missing_image",       # the referenced file does not exist
    "outside_root",        # the reference resolves outside the input/image root (.., symlink, absolute)
    "remote_image",        # a URL (http, https, //host): never fetched
    "empty_file",          # a zero-byte image file
    "bad_file",            # a file that cannot be read (permissions; not a regular file)
    "not_an_image",        # not a format Pillow may open here (JPEG, PNG, GIF, WebP, BMP, TIFF)
    "bad_image",           # a corrupt or truncated image (fails to decode fully)
    "image_too_large",     # above --max-image-pixels (decompression bomb guard) or the byte limit
    "image_too_small",     # a side below --min-image-side
    "bad_aspect",          # long side / short side above --max-aspect
    "duplicate_image",     # the same normalized bytes as an earlier image
)


@dataclass
class RawText:
    text: str
    role: str = ""


@dataclass
class RawImage:
    data: bytes | None = None  # the encoded bytes, when the reader could get them
    error: str = ""            # an IMAGE_REASONS entry when it could not
    src: str = ""              # where it came from (recorded in the document's meta), "" for none


@dataclass
class RawDoc:
    input_id: str  # stable and unique within the input: "pages/a.html", "part-0.parquet:17", ...
    source: str    # the format: html | obelics | pairs | demo
    parts: list[RawText | RawImage] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    error: str = ""             # a DOC_REASONS entry: the reader could not read this document at all
    require_image: bool = False  # pairs: a caption without its image is not a document
    doc_id: str = ""             # the shard key; derived from input_id when empty


_SLUG_RE = re.compile(r"[^A-Za-z0-9]+")


def doc_id_for(source: str, input_id: str) -> str:
    """A shard key (`[A-Za-z0-9_-]+`) that is readable, stable and unique per input id."""
    slug = _SLUG_RE.sub("_", input_id).strip("_")[-40:].strip("_")
    digest = hashlib.sha1(input_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{source}-{slug}-{digest}" if slug else f"{source}-{digest}"


def image_from_data_uri(uri: str) -> RawImage:
    """`data:image/png;base64,...` -> the image bytes (local content: nothing is fetched)."""
    head, _, payload = uri.partition(",")
    try:
        data = base64.b64decode(payload, validate=False) if head.endswith(";base64") else unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        return RawImage(error="bad_image", src=head[:64])
    return RawImage(data=data, src=head[:64])
