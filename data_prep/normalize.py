"""The shared normalizer: one raw input document -> a `schema.Document`, or the reason it is rejected.

Images (Pillow only; nothing else ever parses them):
  size checks on the raw bytes (0 bytes, above --max-image-bytes), `Image.open` restricted to common
  formats, then checks on the header's size before anything is decoded (decompression bombs: above
  --max-image-pixels; below --min-image-side; aspect above --max-aspect), a full decode (JPEGs large
  enough are decoded at a reduced DCT scale, `draft`, which is exact and much faster), EXIF
  orientation applied, mode converted to RGB (transparency flattened on white), resized so the long
  side is at most --max-image-side (Lanczos, aspect kept), re-encoded without metadata: JPEG (quality
  --jpeg-quality) for JPEG/WebP sources, PNG otherwise, unless --image-format says.
Text: NFC-normalized; text that cannot be encoded as UTF-8 (lone surrogates) is `bad_encoding`.
Document: images that fail are dropped one by one (counted per reason); the document is rejected when
nothing is left (`empty_document`), when its text is shorter than --min-text-chars
(`text_too_short`), or, for documents that need an image (pairs), when it lost its image (under the
image's reason).

All of it is deterministic: the same bytes in give the same bytes out (same Pillow/libjpeg build).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageOps

from data_prep.raw import RawDoc, RawImage, RawText, doc_id_for
from data_prep.schema import Document, Segment

Image.init()  # register every plugin now: open(formats=...) looks the names up in Image.OPEN
OPEN_FORMATS = [f for f in ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF") if f in Image.OPEN]
LOSSY_SOURCES = {"JPEG", "MPO", "WEBP"}


@dataclass(frozen=True)
class NormalizeConfig:
    max_image_side: int = 512
    min_image_side: int = 32
    max_aspect: float = 3.0
    max_image_pixels: int = 64 * 2**20
    max_image_bytes: int = 32 * 2**20
    min_text_chars: int = 10
    image_format: str = "auto"  # auto | jpg | png
    jpeg_quality: int = 90

    def __post_init__(self):
        problems = []
        if self.max_image_side < 1 or self.min_image_side < 1 or self.min_image_side > self.max_image_side:
            problems.append("need 1 <= min_image_side <= max_image_side")
        if self.max_aspect < 1:
            problems.append("max_aspect must be >= 1")
        if self.min_text_chars < 1:
            problems.append("min_text_chars must be >= 1 (the training pipeline drops documents without text)")
        if self.image_format not in ("auto", "jpg", "png"):
            problems.append("image_format must be auto, jpg or png")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append("jpeg_quality must be in 1..100")
        if self.max_image_pixels < 1 or self.max_image_bytes < 1:
            problems.append("max_image_pixels and max_image_bytes must be positive")
        if problems:
            raise ValueError("; ".join(problems))

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class NormImage:
    ext: str  # "jpg" | "png"
    data: bytes
    sha256: str
    orig_size: tuple[int, int]
    src: str = ""


class ImageRejected(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _flatten_to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im if im.mode == "RGB" else im.convert("RGB")


def normalize_image(data: bytes, cfg: NormalizeConfig, src: str = "") -> NormImage:
    """Validate and normalize one encoded image. Raises ImageRejected(reason)."""
    if not data:
        raise ImageRejected("empty_file")
    if len(data) > cfg.max_image_bytes:
        raise ImageRejected("image_too_large")
    try:
        im = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
    except Image.DecompressionBombError:
        raise ImageRejected("image_too_large") from None
    except Exception:  # UnidentifiedImageError, or a header so broken that Pillow raises something else
        raise ImageRejected("not_an_image") from None
    with im:
        w, h = im.size
        if w * h > cfg.max_image_pixels:
            raise ImageRejected("image_too_large")
        if min(w, h) < cfg.min_image_side:
            raise ImageRejected("image_too_small")
        if max(w, h) > cfg.max_aspect * min(w, h):
            raise ImageRejected("bad_aspect")
        source_format = im.format
        try:
            if source_format in ("JPEG", "MPO") and max(w, h) >= 2 * cfg.max_image_side:
                s = cfg.max_image_side / max(w, h)
                im.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))
            im.load()
            try:
                out = ImageOps.exif_transpose(im)
            except Exception:  # a broken EXIF block: keep the stored orientation
                out = im
            out = _flatten_to_rgb(out)
            W, H = out.size
            if max(W, H) > cfg.max_image_side:
                s = cfg.max_image_side / max(W, H)
                size = (max(1, round(W * s)), max(1, round(H * s)))
                out = out.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        except Image.DecompressionBombError:
            raise ImageRejected("image_too_large") from None
        except Exception:  # truncated or corrupt data: OSError, SyntaxError, ValueError, EOFError, ...
            raise ImageRejected("bad_image") from None
    ext = cfg.image_format
    if ext == "auto":
        ext = "jpg" if source_format in LOSSY_SOURCES else "png"
    buf = io.BytesIO()
    if ext == "jpg":
        out.save(buf, format="JPEG", quality=cfg.jpeg_quality, optimize=False, progressive=False)
    else:
        out.save(buf, format="PNG", optimize=False)
    encoded = buf.getvalue()
    return NormImage(ext, encoded, hashlib.sha256(encoded).hexdigest(), (w, h), src)


@dataclass
class Normalized:
    """The outcome for one raw document."""

    input_id: str
    doc: Document | None = None
    reason: str = ""  # the document-level rejection reason when doc is None
    images_rejected: Counter = field(default_factory=Counter)
    image_sha256: list[str] = field(default_factory=list)  # of the document's images, in order
    doc_sha256: str = ""
    require_image: bool = False


def document_hash(segments: list[Segment], image_sha: dict[str, str]) -> str:
    """sha256 of the document's content: its texts (with roles) and image hashes, in order.

    Ids, sources and meta are left out, so the same content from two places is one document.
    """
    canon = [["t", s.text, s.role] if s.type == "text" else ["i", image_sha[s.field]] for s in segments]
    return hashlib.sha256(json.dumps(canon, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def _clean_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text.encode("utf-8")  # UnicodeEncodeError for lone surrogates (undecodable bytes smuggled in)
    return text


def normalize_document(raw: RawDoc, cfg: NormalizeConfig) -> Normalized:
    res = Normalized(raw.input_id, require_image=raw.require_image)
    if raw.error:
        res.reason = raw.error
        return res
    segments: list[Segment] = []
    images: dict[str, bytes] = {}
    sha: dict[str, str] = {}
    provenance: list[dict] = []
    first_image_error = ""
    try:
        for part in raw.parts:
            if isinstance(part, RawText):
                text = _clean_text(part.text)
                if not text:
                    continue
                last = segments[-1] if segments else None
                if last is not None and last.type == "text" and last.role == part.role:
                    last.text += text
                else:
                    segments.append(Segment("text", text=text, role=part.role))
            elif isinstance(part, RawImage):
                try:
                    if part.error:
                        raise ImageRejected(part.error)
                    img = normalize_image(part.data or b"", cfg, part.src)
                except ImageRejected as e:
                    res.images_rejected[e.reason] += 1
                    first_image_error = first_image_error or e.reason
                    continue
                name = f"{len(images):04d}.{img.ext}"
                images[name] = img.data
                sha[name] = img.sha256
                segments.append(Segment("image", field=name))
                provenance.append({"src": part.src, "orig_size": list(img.orig_size)})
    except UnicodeError:
        res.reason = "bad_encoding"
        return res
    text_chars = sum(len(s.text.strip()) for s in segments if s.type == "text")
    if raw.require_image and not images:
        res.reason = first_image_error or "missing_image"
    elif text_chars == 0 and not images:
        res.reason = "empty_document"
    elif text_chars < cfg.min_text_chars:
        res.reason = "text_too_short"
    if res.reason:
        return res
    meta = dict(raw.meta)
    if any(p["src"] for p in provenance):  # the demo's drawn pictures have no source to record
        meta["images"] = provenance
    doc = Document(raw.doc_id or doc_id_for(raw.source, raw.input_id), raw.source, segments, images, meta)
    res.doc = doc
    res.image_sha256 = [sha[s.field] for s in segments if s.type == "image"]
    res.doc_sha256 = document_hash(segments, sha)
    return res
