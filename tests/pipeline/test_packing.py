"""Packing documents into rows: what the model is promised by the batch contract."""
import numpy as np
import pytest

from data_prep.demo_corpus import generate_corpus
from data_prep.schema import Document, Segment
from data_prep.tokenizer import train_tokenizer
from model.batch import IGNORE_INDEX
from pipeline.packing import DocumentError, ImageDecoder, PackSpec, Tokenizer, pack_documents, tokenize_document


@pytest.fixture(scope="module")
def tok():
    texts = (s.text for d in generate_corpus(seed=9, n_documents=200) for s in d.segments if s.type == "text")
    return Tokenizer(train_tokenizer(texts, vocab_size=800))


@pytest.fixture(scope="module")
def docs():
    return list(generate_corpus(seed=4, n_documents=60, max_chars=1500))


SPEC = PackSpec(seq_len=256, image_size=16, patch_size=8)


def test_rows_respect_the_batch_contract(tok, docs):
    dropped = {}
    out = pack_documents(docs, tok, SPEC, ImageDecoder(SPEC.image_size), dropped)
    assert not dropped
    R, T = out["tokens"].shape
    assert T == SPEC.seq_len and R > 1
    assert out["images"].shape == (R, SPEC.max_images, 3, 16, 16) and out["images"].dtype == np.uint8
    n_tokens_in = sum(len(p.ids) for d in docs for p in tokenize_document(d, tok, SPEC, ImageDecoder(16)))
    assert int((out["segment_ids"] != 0).sum()) == n_tokens_in  # nothing lost, nothing duplicated
    for r in range(R):
        toks, tg, seg, pos = out["tokens"][r], out["targets"][r], out["segment_ids"][r], out["positions"][r]
        n_patch = int((toks == tok.img_patch).sum())
        assert n_patch == out["n_images"][r] * SPEC.n_patches
        assert (toks[seg == 0] == tok.pad).all()
        for s in np.unique(seg[seg != 0]):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all()  # a segment is contiguous
            assert (pos[idx] == np.arange(len(idx))).all()
            # a target is the next token of the same segment, and only where that token is text
            inner = idx[:-1]
            special = np.isin(toks[inner + 1], [tok.img_patch, tok.img_begin, tok.img_end, tok.doc, tok.pad])
            assert (tg[inner][~special] == toks[inner + 1][~special]).all()
            assert (tg[inner][special] == IGNORE_INDEX).all()
            assert tg[idx[-1]] == IGNORE_INDEX
            # images are never cut: every begin has its patches and its end in the segment
            begins = np.flatnonzero(toks[idx] == tok.img_begin)
            for b in begins:
                assert (toks[idx][b + 1:b + 1 + SPEC.n_patches] == tok.img_patch).all()
                assert toks[idx][b + 1 + SPEC.n_patches] == tok.img_end


def test_answer_mask_marks_the_answer_tokens(tok, docs):
    out = pack_documents(docs, tok, SPEC, ImageDecoder(16))
    n_answers = sum(1 for d in docs if d.meta["kind"] == "retrieval")
    assert n_answers > 0
    masked_targets = out["targets"][out["answer_mask"]]
    assert (masked_targets != IGNORE_INDEX).all()
    decoded = tok.hf.decode(masked_targets.tolist())
    for d in docs:
        if d.meta["kind"] == "retrieval":
            assert d.meta["answer"] in decoded


def test_long_document_is_split_between_images(tok):
    segs = []
    images = {}
    for i in range(12):
        segs.append(Segment("text", text=f"picture number {i} shows many things and more words here. "))
        images[f"{i:04d}.png"] = next(iter(next(generate_corpus(seed=0, n_documents=1)).images.values()), b"")
        segs.append(Segment("image", field=f"{i:04d}.png"))
    doc = Document("long", "t", segs, images)
    pieces = tokenize_document(doc, tok, SPEC, ImageDecoder(16))
    assert len(pieces) > 1 and all(len(p.ids) <= SPEC.seq_len for p in pieces)
    assert sum(len(p.images) for p in pieces) == 12
    for p in pieces:
        assert p.ids.count(tok.img_patch) == len(p.images) * SPEC.n_patches


def test_bad_images_drop_the_document_and_are_counted(tok, docs):
    broken = Document("bad", "t", [Segment("text", text="hello"), Segment("image", field="0000.png")],
                      {"0000.png": b"\x89PNG\r\n\x1a\n this is not an image"})
    textless = Document("empty", "t", [Segment("text", text="")])
    dropped = {}
    out = pack_documents([docs[0], broken, textless], tok, SPEC, ImageDecoder(16), dropped)
    assert dropped == {"bad_image": 1, "no_text": 1}
    assert len(out["tokens"]) >= 1
    with pytest.raises(DocumentError):
        pack_documents([broken], tok, SPEC, ImageDecoder(16))


def test_the_data_path_does_not_import_torch():
    # Ray Data's read tasks and pack actors import pipeline.data; torch (and triton through the
    # kernels) would add seconds of start-up to every one of those processes for nothing
    import subprocess
    import sys

    code = "import sys, pipeline.data; print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
