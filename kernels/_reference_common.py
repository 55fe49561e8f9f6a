"""Helpers shared by the plain-PyTorch references (kernels/*/reference.py) and by nothing else: the
Triton paths never import this module, so a reference stays independent of the kernel it checks."""
from __future__ import annotations

# Query rows per chunk: keeps an [H, C, L] score tensor near 32M floats at a few thousand tokens.
CHUNK_ELEMS = 1 << 25


def sequences(B: int, T: int, cu_seqlens):
    """(batch row, start, end) of every non-empty sequence, in token order."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(0, s, e) for s, e in zip(cu[:-1], cu[1:]) if e > s]
