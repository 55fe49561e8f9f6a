"""Helpers of the model tests: synthetic packed batches, small configs and attention contexts
(imported by the tests; fixtures are in conftest.py).

Run: `pytest -q tests/model` (CPU; the Triton path runs in the interpreter, set up by tests/conftest.py).
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

from model.attention import AttnContext, DenseMask, DocLayout
from model.batch import IGNORE_INDEX, Batch
from model.config import ModelConfig, MoEConfig, MSAConfig
from model.layers import rope_cos_sin

IMG_BEGIN, IMG_END, IMG_PATCH = 2, 3, 4  # special ids as in data_prep/schema.py (PAD, DOC, BEGIN, END, PATCH)


def build_batch(cfg: ModelConfig, doc_lens_per_row: list[list[int]], T: int, images_per_row: list[int] | None = None,
                seed: int = 0, n_slots: int | None = None) -> Batch:
    """Rows of packed documents (segment ids 1, 2, ...; the rest of the row padding, segment 0).

    images_per_row[r] images are placed at the start of row r's first document; n_slots image slots
    per row (default: as many as the most images of a row, at least 1).
    """
    g = torch.Generator().manual_seed(seed)
    B = len(doc_lens_per_row)
    images_per_row = images_per_row or [0] * B
    n_slots = n_slots or max(1, max(images_per_row))
    tokens = torch.zeros(B, T, dtype=torch.int64)
    positions = torch.zeros(B, T, dtype=torch.int64)
    segments = torch.zeros(B, T, dtype=torch.int32)
    text = torch.zeros(B, T, dtype=torch.bool)
    images = torch.zeros(B, n_slots, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
    for r, lens in enumerate(doc_lens_per_row):
        assert sum(lens) <= T
        t = 0
        for d, L in enumerate(lens):
            tokens[r, t:t + L] = torch.randint(8, cfg.vocab_size, (L,), generator=g)
            text[r, t:t + L] = True
            positions[r, t:t + L] = torch.arange(L)
            segments[r, t:t + L] = d + 1
            if d == 0:
                p = t + 1
                for m in range(images_per_row[r]):
                    span = [IMG_BEGIN] + [IMG_PATCH] * cfg.n_patches + [IMG_END]
                    assert p + len(span) <= t + L
                    tokens[r, p:p + len(span)] = torch.tensor(span)
                    text[r, p:p + len(span)] = False
                    images[r, m] = torch.randint(0, 256, (3, cfg.image_size, cfg.image_size), generator=g,
                                                 dtype=torch.uint8)
                    p += len(span)
            t += L
        positions[r, t:] = torch.arange(T - t)
    # next-token targets inside a document where the next token is text
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)
    same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
    ok = same_doc & text[:, 1:]
    targets[:, :-1] = torch.where(ok, tokens[:, 1:], IGNORE_INDEX)
    return Batch(tokens_BT=tokens, targets_BT=targets, positions_BT=positions, segment_ids_BT=segments,
                 images_BNCHW=images, n_images_B=torch.tensor(images_per_row, dtype=torch.int32),
                 answer_mask_BT=torch.zeros(B, T, dtype=torch.bool))


def small_config(**over) -> ModelConfig:
    """A tiny-shaped config small enough for fast unit tests (T ~ 128-256)."""
    msa = dict(enabled=True, n_dense_layers=1, block_size=16, topk=3, index_dim=16, backend="reference")
    moe = dict(enabled=True, n_dense_layers=1, n_experts=4, top_k=2, expert_hidden=32, n_shared_experts=1)
    msa.update(over.pop("msa", {}))
    moe.update(over.pop("moe", {}))
    base = dict(vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=96,
                max_seq_len=256, image_size=16, patch_size=8)
    base.update(over)
    return ModelConfig(**base, msa=MSAConfig(**msa), moe=MoEConfig(**moe))



def attn_context(cfg: ModelConfig, batch: Batch, mode: str = "sparse", impl: str | None = None) -> AttnContext:
    """The attention context the model builds for `batch` (document layout, dense mask, RoPE), without
    statistics; `impl` overrides `cfg.dense_impl` ("sdpa" | "flex")."""
    layout = DocLayout.from_segments(batch.segment_ids_BT)
    return AttnContext(layout=layout, mask=DenseMask(layout, impl or cfg.dense_impl),
                       rope=rope_cos_sin(batch.positions_BT, cfg.effective_rope_dim, cfg.rope_theta),
                       mode=mode, compute_stats=False)


def with_and_without_recompute(cfg: ModelConfig, batch: Batch, mode: str, wrap=None) -> tuple[list, list]:
    """The same weights run forward and backward once without and once with activation checkpointing
    (the KL's draw seeded alike): ([losses, losses], [grads, grads]), grads as full tensors by name.
    `wrap(model)` applies a data-parallel wrapper (DDP, FSDP2) before the forward."""
    from model.transformer import MultimodalTransformer

    losses, grads = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = MultimodalTransformer(dataclasses.replace(cfg, activation_checkpointing=recompute), IMG_PATCH)
        model.set_mode(mode)
        run = wrap(model) if wrap else model
        torch.manual_seed(1)  # the KL's draw
        out = run(batch, compute_stats=False)
        w = model.loss_weights()
        sum(w[k] * v for k, v in out.losses.items()).backward()
        losses.append({k: float(v.detach()) for k, v in out.losses.items()})
        grads.append({n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                      for n, p in model.named_parameters() if p.grad is not None})
    return losses, grads


def leave_worker() -> None:
    """End a spawned test worker once its results are written and its process group destroyed, without
    the interpreter's teardown: there torch's gloo threads now and then abort the process ("terminate
    called without an active exception", after all the work: about 1 run in 25 of the FSDP2 test here;
    the race is described in pytorch/pytorch PR 179291), which would fail a test whose results are in.
    Not reached when the worker raises: its error still fails the test."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
