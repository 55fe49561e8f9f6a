"""The demo corpus generator: seeded, deterministic, and its questions answerable from the document."""
import io
import re

import pytest
from PIL import Image

from data_prep.demo_corpus import COLORS, COUNT_WORDS, SHAPES, generate_corpus, generate_document


def _sample_bytes(doc):
    return doc.to_sample()


def test_same_seed_same_documents_byte_for_byte():
    a = [_sample_bytes(d) for d in generate_corpus(seed=7, n_documents=40)]
    b = [_sample_bytes(d) for d in generate_corpus(seed=7, n_documents=40)]
    assert a == b


def test_document_depends_only_on_seed_and_index():
    whole = list(generate_corpus(seed=3, n_documents=30))
    assert _sample_bytes(generate_document(3, 17)) == _sample_bytes(whole[17])


def test_other_seed_gives_other_documents():
    a = [_sample_bytes(d)["json"] for d in generate_corpus(seed=1, n_documents=20)]
    b = [_sample_bytes(d)["json"] for d in generate_corpus(seed=2, n_documents=20)]
    assert sum(x == y for x, y in zip(a, b)) == 0


def test_all_kinds_and_question_types_occur():
    docs = list(generate_corpus(seed=0, n_documents=300))
    kinds = {d.meta["kind"] for d in docs}
    assert kinds == {"caption", "story", "retrieval"}
    qa = {d.meta["qa_type"] for d in docs if d.meta["kind"] == "retrieval"}
    assert qa == {"fact", "color", "count", "shape"}


def test_images_decode_and_match_segments():
    for doc in generate_corpus(seed=5, n_documents=30, image_size=48):
        fields = [s.field for s in doc.segments if s.type == "image"]
        assert sorted(fields) == sorted(doc.images)
        for data in doc.images.values():
            im = Image.open(io.BytesIO(data))
            im.load()
            assert im.size == (48, 48) and im.mode == "RGB"


def _pixels_of(color_name, data):
    im = Image.open(io.BytesIO(data)).convert("RGB")
    target = COLORS[color_name]
    return sum(1 for p in im.getdata() if p == target)


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_answers_are_grounded_in_the_document(seed):
    n_checked = 0
    for doc in generate_corpus(seed=seed, n_documents=200, max_chars=1500):
        if doc.meta["kind"] != "retrieval":
            continue
        *body, question, answer = doc.segments
        assert answer.role == "answer" and answer.text == f" {doc.meta['answer']}."
        assert question.type == "text" and question.text.rstrip().endswith("Answer:")
        earlier = "".join(s.text for s in body if s.type == "text")
        qa = doc.meta["qa_type"]
        if qa == "fact":
            m = re.search(r"code of the (\w+) (\w+)\?", question.text)
            assert f"The code of the {m.group(1)} {m.group(2)} is {doc.meta['answer']}." in earlier
            # the asked-for object is named exactly once: distractors never repeat it
            assert earlier.count(f"code of the {m.group(1)} {m.group(2)} is") == 1
        else:
            name = re.search(r"picture (\w)\?", question.text).group(1)
            i = next(i for i, s in enumerate(body) if s.type == "text" and f"Remember picture {name}." in s.text)
            key_image = body[i + 1]
            assert key_image.type == "image"
            data = doc.images[key_image.field]
            if qa == "color":
                assert doc.meta["answer"] in COLORS and _pixels_of(doc.meta["answer"], data) > 20
            elif qa == "count":
                assert doc.meta["answer"] in COUNT_WORDS
            else:
                assert doc.meta["answer"] in SHAPES
        assert doc.meta["distance_chars"] > 0
        n_checked += 1
    assert n_checked > 40


def test_retrieval_documents_mark_their_key_item():
    for doc in generate_corpus(seed=2, n_documents=120, max_chars=1500):
        if doc.meta["kind"] != "retrieval":
            assert not any(s.role == "key" for s in doc.segments)
            continue
        roles = [s.role for s in doc.segments]
        (k,) = [i for i, r in enumerate(roles) if r == "key"]
        assert k < roles.index("answer")
        key = doc.segments[k]
        if doc.meta["qa_type"] == "fact":
            assert key.text.startswith("The code of the ") and doc.meta["answer"] in key.text
        else:
            assert key.text.startswith("Remember picture ") and doc.segments[k + 1].type == "image"


def _est_tokens(doc, image_tokens):
    from data_prep.demo_corpus import CHARS_PER_TOKEN

    return sum(len(s.text) / CHARS_PER_TOKEN if s.type == "text" else image_tokens for s in doc.segments)


def test_token_mode_fills_the_context_and_spreads_distances_up_to_it():
    L, img = 2048, 18
    docs = list(generate_corpus(seed=0, n_documents=400, doc_tokens=L, image_tokens=img))
    sizes = [_est_tokens(d, img) for d in docs]
    assert max(sizes) <= L  # the margin keeps documents inside a row of L tokens
    stories = [s for s, d in zip(sizes, docs) if d.meta["kind"] == "story"]
    assert min(stories) >= 0.4 * L and max(stories) >= 0.85 * L
    retrieval = [d for d in docs if d.meta["kind"] == "retrieval"]
    assert len(retrieval) > 120
    dist = [d.meta["distance_tokens_est"] for d in retrieval]
    assert min(dist) >= 16 and max(dist) <= L
    # geometric buckets up to the context are all populated, for text facts and picture facts alike
    edges = [0, L // 32, L // 16, L // 8, L // 4, L // 2, L + 1]
    for kinds in ({"fact"}, {"color", "count", "shape"}):
        ds = [d.meta["distance_tokens_est"] for d in retrieval if d.meta["qa_type"] in kinds]
        counts = [sum(lo <= x < hi for x in ds) for lo, hi in zip(edges, edges[1:])]
        assert all(c >= 3 for c in counts[1:]), counts


def test_token_mode_is_deterministic_and_leaves_the_default_alone():
    a = generate_document(5, 11, doc_tokens=1024)
    assert a.to_sample() == generate_document(5, 11, doc_tokens=1024).to_sample()
    assert "distance_tokens_est" not in generate_document(5, 11).meta
