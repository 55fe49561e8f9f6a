"""Documents -> fixed-length training rows: tokenize, decode images, pack, keep document boundaries.

Plain Python/NumPy with no Ray in it, so the Ray Data actors (`pipeline.data`), the evaluation and the
tests all pack the same way.

Each document becomes `<|doc|> ...` with text tokenized and every image replaced by
`<|img_begin|> <|img_patch|> x P <|img_end|>`. Documents longer than a row are cut into row-sized
pieces, never inside an image. The pieces of a batch of documents are packed into rows by first-fit
decreasing (deterministic, little padding). Inside a row every piece is its own attention segment with
positions restarting at 0; targets are next-token ids where the next token is text, so the LM loss
covers text only.

Legend: R rows, T tokens per row, N image slots per row, S image side.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from data_prep.schema import DOC, IMG_BEGIN, IMG_END, IMG_PATCH, PAD, Document
from model.tokens import IGNORE_INDEX, image_patches, image_tokens

# Pillow refuses images above this many pixels (decompression bombs); the demo's are 4K pixels and
# real photos a few megapixels.
Image.MAX_IMAGE_PIXELS = 64 * 2**20


class DocumentError(ValueError):
    """A document that cannot be used; `reason` is the counter it is recorded under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def piece_uid(key: str, index: int) -> int:
    """A stable 62-bit id of piece `index` of the document `key` of one shard (index -1: the whole
    document, dropped); 0 is never an id, it pads the `piece_ids` column."""
    digest = hashlib.blake2b(f"{key}#{index}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & ((1 << 62) - 1)) or 1


@dataclass
class PackSpec:
    seq_len: int
    image_size: int
    patch_size: int
    id_slots: int = 0  # width of the `piece_ids` column (0: no such column)

    @property
    def n_patches(self) -> int:
        return image_patches(self.image_size, self.patch_size)

    @property
    def image_tokens(self) -> int:
        return image_tokens(self.image_size, self.patch_size)

    @property
    def max_images(self) -> int:
        return self.seq_len // self.image_tokens


@dataclass
class Piece:
    """A run of one document's tokens that goes into one row."""

    ids: list[int]
    is_text: list[bool]
    is_answer: list[bool]
    images: list[np.ndarray] = field(default_factory=list)  # uint8 [3, S, S] each
    is_last: bool = True  # the document's final piece (the row holding it completes the document)
    uid: int = 0  # piece_uid(document key, piece number), when the stream tracks its position


class ImageDecoder:
    """Bytes -> uint8 [3, S, S]: fully decoded, RGB, resized on the short side (bilinear, antialiased)
    and centre-cropped. Pillow only: importing torchvision would cost every data and training
    process seconds at start-up."""

    def __init__(self, image_size: int):
        self.size = image_size

    def __call__(self, data: bytes) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                rgb = im.convert("RGB")
        except Image.DecompressionBombError as e:
            raise DocumentError("image_too_large", str(e)) from None
        except Exception as e:  # Pillow raises many types for corrupt data
            raise DocumentError("bad_image", f"{type(e).__name__}: {e}") from None
        S = self.size
        w, h = rgb.size
        # the short side becomes S, the long side keeps the aspect ratio (truncated, at least S)
        nw, nh = (S, max(S, int(S * h / w))) if w <= h else (max(S, int(S * w / h)), S)
        if (nw, nh) != (w, h):
            rgb = rgb.resize((nw, nh), Image.Resampling.BILINEAR)  # Pillow filters over the whole footprint
        left, top = int(round((nw - S) / 2.0)), int(round((nh - S) / 2.0))
        crop = rgb.crop((left, top, left + S, top + S))
        return np.ascontiguousarray(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1))


class Tokenizer:
    """The parts of the HF tokenizer the packer needs, with the special ids looked up once."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        ids = {name: hf_tokenizer.token_to_id(name) for name in (PAD, DOC, IMG_BEGIN, IMG_END, IMG_PATCH)}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.pad, self.doc, self.img_begin, self.img_end, self.img_patch = (
            ids[PAD], ids[DOC], ids[IMG_BEGIN], ids[IMG_END], ids[IMG_PATCH])
        self.vocab_size = hf_tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids


def tokenize_document(doc: Document, tok: Tokenizer, spec: PackSpec, decode: ImageDecoder) -> list[Piece]:
    """One document -> its pieces (one piece unless longer than a row). Raises DocumentError."""
    ids, is_text, is_answer = [tok.doc], [False], [False]
    images: list[np.ndarray] = []
    cut_ok = [True]  # cut_ok[i]: a row may start at token i
    for seg in doc.segments:
        if seg.type == "text":
            new = tok.encode(seg.text)
            ids += new
            is_text += [True] * len(new)
            is_answer += [seg.role == "answer"] * len(new)
            cut_ok += [True] * len(new)
        else:
            images.append(decode(doc.images[seg.field]))
            n = spec.image_tokens
            ids += [tok.img_begin] + [tok.img_patch] * spec.n_patches + [tok.img_end]
            is_text += [False] * n
            is_answer += [False] * n
            cut_ok += [True] + [False] * (n - 1)
    if not any(is_text):
        raise DocumentError("no_text")
    # cut into pieces of at most seq_len tokens, at allowed cut points
    pieces, start, img_i = [], 0, 0
    T = spec.seq_len
    while start < len(ids):
        end = min(start + T, len(ids))
        while end < len(ids) and not cut_ok[end]:
            end -= 1
        n_img = sum(1 for t in ids[start:end] if t == tok.img_begin)
        pieces.append(Piece(ids[start:end], is_text[start:end], is_answer[start:end], images[img_i:img_i + n_img],
                            is_last=end == len(ids)))
        img_i += n_img
        start = end
    return pieces


def pack_pieces(pieces: list[Piece], spec: PackSpec, pad_id: int, one_per_row: bool = False,
                extra_ids: list[int] = ()) -> dict[str, np.ndarray]:
    """First-fit-decreasing packing of pieces into rows (or, with one_per_row, piece i alone in row i);
    returns the batch columns (numpy). With `spec.id_slots`, a `piece_ids` column lists each row's
    piece ids, and the first row also `extra_ids` (the dropped documents of the group)."""
    T, N, S = spec.seq_len, spec.max_images, spec.image_size
    order = range(len(pieces)) if one_per_row else sorted(range(len(pieces)), key=lambda i: (-len(pieces[i].ids), i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if one_per_row:
            rows.append([i])
            free.append(0)
            continue
        n = len(pieces[i].ids)
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(T - n)
    R = len(rows)
    out = {
        "tokens": np.full((R, T), pad_id, np.int32),
        "targets": np.full((R, T), IGNORE_INDEX, np.int32),
        "positions": np.zeros((R, T), np.int32),
        "segment_ids": np.zeros((R, T), np.int32),
        "images": np.zeros((R, N, 3, S, S), np.uint8),
        "n_images": np.zeros((R,), np.int32),
        "answer_mask": np.zeros((R, T), np.bool_),
        "docs_done": np.zeros((R,), np.int32),
    }
    if spec.id_slots:
        out["piece_ids"] = np.zeros((R, spec.id_slots), np.int64)
    for r, members in enumerate(rows):
        out["docs_done"][r] = sum(pieces[i].is_last for i in members)
        if spec.id_slots:
            ids = [pieces[i].uid for i in members] + (list(extra_ids) if r == 0 else [])
            if len(ids) > spec.id_slots:
                raise ValueError(f"a row of {len(ids)} pieces exceeds the {spec.id_slots} id slots")
            out["piece_ids"][r, :len(ids)] = ids
        pos, n_img = 0, 0
        for seg, i in enumerate(members, start=1):
            p = pieces[i]
            L = len(p.ids)
            ids = np.asarray(p.ids, np.int32)
            out["tokens"][r, pos:pos + L] = ids
            nxt_text = np.asarray(p.is_text[1:], np.bool_)
            out["targets"][r, pos:pos + L - 1] = np.where(nxt_text, ids[1:], IGNORE_INDEX)
            out["answer_mask"][r, pos:pos + L - 1] = np.asarray(p.is_answer[1:], np.bool_)
            out["positions"][r, pos:pos + L] = np.arange(L)
            out["segment_ids"][r, pos:pos + L] = seg
            for im in p.images:
                out["images"][r, n_img] = im
                n_img += 1
            pos += L
        out["n_images"][r] = n_img
        # padding: a segment of its own (id 0), positions 0.. so RoPE stays in range
        out["positions"][r, pos:] = np.arange(T - pos)
    return out


def empty_columns(spec: PackSpec) -> dict[str, np.ndarray]:
    """Zero-row batch columns with the right dtypes and trailing shapes."""
    T, N, S = spec.seq_len, spec.max_images, spec.image_size
    ids = {"piece_ids": np.zeros((0, spec.id_slots), np.int64)} if spec.id_slots else {}
    return ids | {
        "tokens": np.zeros((0, T), np.int32), "targets": np.zeros((0, T), np.int32),
        "positions": np.zeros((0, T), np.int32), "segment_ids": np.zeros((0, T), np.int32),
        "images": np.zeros((0, N, 3, S, S), np.uint8), "n_images": np.zeros((0,), np.int32),
        "answer_mask": np.zeros((0, T), np.bool_), "docs_done": np.zeros((0,), np.int32),
    }


def carrier_row(spec: PackSpec, pad_id: int, ids: list[int]) -> dict[str, np.ndarray]:
    """One row of padding only (no targets) that carries bookkeeping: ids of dropped documents."""
    out = pack_pieces([Piece([pad_id], [False], [False])], spec, pad_id)
    out["segment_ids"][:] = 0  # the placeholder piece becomes padding like the rest of the row
    out["positions"][0] = np.arange(spec.seq_len)
    out["docs_done"][:] = 0
    if spec.id_slots:
        out["piece_ids"][0] = 0
        out["piece_ids"][0, :len(ids)] = ids
    return out


def pack_documents(docs: list[Document], tok: Tokenizer, spec: PackSpec, decode: ImageDecoder,
                   dropped: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Tokenize and pack a list of documents; unusable documents are counted in `dropped`."""
    pieces: list[Piece] = []
    for doc in docs:
        try:
            pieces += tokenize_document(doc, tok, spec, decode)
        except DocumentError as e:
            if dropped is None:
                raise
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
    if not pieces:
        return empty_columns(spec)
    return pack_pieces(pieces, spec, tok.pad)
