"""Helpers shared by the plain-PyTorch references (kernels/*/reference.py) and by nothing else: the
Triton paths never import this module, so a reference stays independent of the kernel it checks."""
from __future__ import annotations

# Query rows per chunk: keeps an [H, C, L] score tensor near 32M floats at a few thousand tokens.
CHUNK_ELEMS = 1 << 25
# At most this many query rows per chunk, so that a chunk's keys can stop at its last query (causal:
# no query of rows [c0, c1) sees a key at or after c1): about half the scores of a sequence are built
# instead of all L x L of them.
CHUNK_ROWS = 128
# Autograd keeps the scores and probabilities of a call's chunks (~8 bytes per score) up to this many
# scores; the chunks beyond are recomputed in the backward instead (activation checkpointing), so
# memory stays bounded at a few thousand tokens while short sequences skip the recomputation.
SAVED_SCORES = 1 << 24


def sequences(B: int, T: int, cu_seqlens):
    """(batch row, start, end) of every non-empty sequence, in token order."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(0, s, e) for s, e in zip(cu[:-1], cu[1:]) if e > s]


def causal_chunks(L: int, H: int):
    """(c0, c1) query rows of a sequence of L tokens, in order; a chunk's keys are rows [0, c1)."""
    step = max(1, min(CHUNK_ROWS, CHUNK_ELEMS // (H * L)))
    return [(c0, min(L, c0 + step)) for c0 in range(0, L, step)]
