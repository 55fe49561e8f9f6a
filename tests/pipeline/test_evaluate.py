"""The held-out evaluation's parts: buckets, the image-text mask, token distances of retrieval
questions, and one evaluation of a small random model on real held-out shards.

    pytest -q tests/pipeline/test_evaluate.py
"""
from pathlib import Path

import pytest
import torch

from data_prep.reader import iter_documents
from data_prep.tokenizer import load_tokenizer
from model.batch import IGNORE_INDEX, Batch
from pipeline.evaluate import bucket_edges, bucket_name, evaluate, image_text_mask, key_distance
from pipeline.packing import ImageDecoder, PackSpec, Tokenizer, tokenize_document


def test_buckets_are_geometric_in_the_context():
    assert bucket_edges(1024) == (0, 32, 64, 128, 256, 512, 1024)
    assert bucket_edges(16384) == (0, 512, 1024, 2048, 4096, 8192, 16384)
    e = bucket_edges(1024)
    assert [bucket_name(v, e) for v in (0, 31, 32, 500, 512, 1023, 5000)] == \
        ["0-32", "0-32", "32-64", "256-512", "512-1024", "512-1024", "512-1024"]


def test_image_text_mask_marks_text_right_after_an_image():
    # row: <doc> a b <begin> p p <end> c d e f | next segment: <doc> g <end> h
    BEGIN, END, PATCH = 2, 3, 4
    tokens = torch.tensor([[1, 10, 11, BEGIN, PATCH, PATCH, END, 12, 13, 14, 15, 1, 16, END, 17]])
    seg = torch.tensor([[1] * 11 + [2] * 4])
    pos = torch.tensor([list(range(11)) + list(range(4))])
    is_text = torch.tensor([[False, True, True, False, False, False, False, True, True, True, True,
                             False, True, False, True]])
    targets = torch.full_like(tokens, IGNORE_INDEX)
    same = seg[:, 1:] == seg[:, :-1]
    targets[:, :-1] = torch.where(same & is_text[:, 1:], tokens[:, 1:], IGNORE_INDEX)
    b = Batch(tokens, targets, pos, seg.int(), torch.zeros(1, 1, 3, 8, 8, dtype=torch.uint8),
              torch.tensor([1], dtype=torch.int32), torch.zeros_like(tokens, dtype=torch.bool))
    m = image_text_mask(b, END, window=3)
    # targets at 6 (end -> c), 7, 8 are within 3 tokens of the end at 6; 9 is not; segment 2's
    # end at 13 predicts h
    assert torch.nonzero(m[0]).flatten().tolist() == [6, 7, 8, 13]
    assert not (m & (targets == IGNORE_INDEX)).any()


@pytest.fixture(scope="module")
def tokenizer(demo_shards):
    return Tokenizer(load_tokenizer(Path(demo_shards) / "tokenizer.json"))


def test_key_distance_matches_the_packed_tokens(tokenizer, heldout_shards):
    spec = PackSpec(1024, 32, 8)
    decode = ImageDecoder(32)
    n = 0
    for doc in iter_documents(Path(heldout_shards)):
        if doc.meta.get("kind") != "retrieval":
            continue
        (piece, *rest) = tokenize_document(doc, tokenizer, spec, decode)
        if rest:
            continue
        d = key_distance(doc, tokenizer, spec)
        answer_at = piece.is_answer.index(True)
        key_at = answer_at - d
        text = tokenizer.hf.decode(piece.ids[key_at:key_at + 4])
        assert text.startswith(("The code", "Remember picture")), text
        n += 1
    assert n > 10


def test_evaluate_a_small_model_on_held_out_shards(tokenizer, demo_shards, heldout_shards):
    from model.config import MoEConfig, ModelConfig, MSAConfig
    from model.transformer import MultimodalTransformer

    cfg = ModelConfig(vocab_size=2048, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                      ffn_hidden=64, max_seq_len=1024, image_size=32, patch_size=8,
                      msa=MSAConfig(n_dense_layers=1, block_size=32, topk=4, index_dim=16),
                      moe=MoEConfig(enabled=False))
    model = MultimodalTransformer(cfg, img_patch_id=tokenizer.img_patch)
    args = (str(heldout_shards), str(Path(demo_shards) / "tokenizer.json"), 1024, 32, 8, torch.device("cpu"))
    res = evaluate(model, *args, batch_size=4, max_documents=30, stats_batches=1)
    assert res.documents == 30 and len(res.documents_sha256) == 64
    assert sum(n for _, n in res.by_position.values()) == res.lm_tokens
    assert res.image_text[1] + res.other_text[1] == res.lm_tokens and res.image_text[1] > 0
    total = res.image_text[0] + res.other_text[0]
    assert total / res.lm_tokens == pytest.approx(res.lm_loss, rel=1e-6)
    assert sum(n for _, n in res.by_bucket.values()) == res.questions > 0
    assert sum(n for _, n in res.by_kind.values()) == res.questions
    assert "unknown" not in res.by_bucket  # the demo marks its key items
    assert 0 < res.stats["sparsity"] < 1 and "layer/1/score_recall" in res.stats
    m = res.metrics()
    assert "eval/lm_loss/pos_0-32" in m and "eval/sparsity" in m
    again = evaluate(model, *args, batch_size=2, max_documents=30)
    assert again.documents_sha256 == res.documents_sha256
    assert again.lm_loss == pytest.approx(res.lm_loss, rel=1e-5)  # batching does not change the loss
    assert evaluate(model, *args, max_documents=29).documents_sha256 != res.documents_sha256
