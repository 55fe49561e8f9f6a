"""The packed-sequence tables shared by the Triton paths: tiles, per-tile unions, reverse index.

Run: `pytest -q tests/kernels/test_msa_common.py`.
"""
import torch

from kernels import _common
from msa_numerics import random_block_idx


def test_tile_table_splits_each_sequence_from_its_start():
    cu = torch.tensor([0, 5, 5, 40, 41], dtype=torch.int32)  # includes an empty sequence
    start, s0, e0, P = _common.tile_table(cu, 41, 16)
    got = sorted((int(a), int(b), int(c)) for a, b, c in zip(start, s0, e0) if c > a)
    assert got == [(0, 0, 5), (5, 5, 40), (21, 5, 40), (37, 5, 40), (40, 40, 41)]
    assert P >= len(got)


def test_union_lists_and_reverse_index_match_brute_force():
    T, H, K, BS = 70, 2, 3, 16
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    bidx = random_block_idx(1, T, H, K, BS, cu)[0]  # [T, H, K]
    bidx[5, 0, 0] = bidx[5, 0, 1]  # a duplicate must count once
    start, s0, e0, P = _common.tile_table(cu, T, 4)
    union, count = _common.union_lists(bidx, start, s0, e0, 4, BS)
    for p in range(P):
        toks = range(int(start[p]), int(e0[p])) if e0[p] > start[p] else []
        toks = [t for t in toks if t < int(start[p]) + 4]
        for h in range(H):
            want = sorted({int(b) for t in toks for b in bidx[t, h] if b >= 0})
            assert union[p, h, : count[p, h]].tolist() == want
            assert (union[p, h, count[p, h]:] == -1).all()

    tokens, offsets, C = _common.reverse_index(bidx, cu, BS)
    bstart, _, bend, _ = _common.tile_table(cu, T, BS)
    seq = lambda t: 0 if t < 30 else 1  # noqa: E731
    for h in range(H):
        for c in range(C):
            got = tokens[offsets[h * C + c]: offsets[h * C + c + 1]].tolist()
            if bend[c] <= bstart[c]:
                assert got == []
                continue
            s = seq(int(bstart[c]))
            blk = (int(bstart[c]) - int(cu[s])) // BS
            want = [t for t in range(T) if seq(t) == s and blk in set(bidx[t, h].tolist())]
            assert got == want


def test_split_index_matches_brute_force():
    # Work lists of the split schedule: (group, query chunk, key block) -> (token, sorted slot).
    T, H, K, BS, Tc = 70, 2, 4, 16, 24
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    bidx = random_block_idx(1, T, H, K, BS, cu)[0]
    bidx[7, 1, 0] = bidx[7, 1, 1]  # a duplicate must count once
    bidx[50, 0, 0] = 9  # a block after the token's own one (future keys only) is dropped
    idx = _common.split_index(bidx, cu, BS, Tc)
    bstart, _, bend, _ = _common.tile_table(cu, T, BS)
    assert idx.n_chunks == 3 and idx.offsets.numel() == H * idx.n_chunks * idx.C + 1
    seq = lambda t: 0 if t < 30 else 1  # noqa: E731
    n_pairs = 0
    for h in range(H):
        for ch in range(idx.n_chunks):
            for c in range(idx.C):
                i = (h * idx.n_chunks + ch) * idx.C + c
                lo, hi = int(idx.offsets[i]), int(idx.offsets[i + 1])
                got = list(zip(idx.tokens_E[lo:hi].tolist(), idx.slots_E[lo:hi].tolist()))
                want = []
                if bend[c] > bstart[c]:
                    s = seq(int(bstart[c]))
                    blk = (int(bstart[c]) - int(cu[s])) // BS
                    for t in range(ch * Tc, min(T, (ch + 1) * Tc)):
                        srt = sorted(set(bidx[t, h].tolist()))
                        local = (t - int(cu[seq(t)])) // BS
                        if seq(t) == s and blk in srt and blk <= local:
                            want.append((t, bidx[t, h].sort().values.tolist().index(blk)))
                assert got == want, (h, ch, c)
                n_pairs += len(got)
    assert int(idx.valid_NHK.sum()) == n_pairs  # one valid slot per pair, nothing else


def test_poisoned_outputs_context():
    with _common.poisoned_outputs():
        assert torch.isnan(_common.empty((3,), torch.float32, "cpu")).all()
        assert (_common.empty((3,), torch.int32, "cpu") == -2).all()
