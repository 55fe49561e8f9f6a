"""The packed-sequence tables shared by the Triton paths: tiles, per-tile unions, reverse index.
On the GPU where there is one (the work lists' key kernel is Triton), else in the interpreter; the
tables come back to the CPU for the brute-force loops.

Run: `pytest -q tests/kernels/test_msa_common.py`.
"""
import pytest
import torch

from kernels import _common
from msa_numerics import random_block_idx


def _cpu(*xs):
    return [x.cpu() if isinstance(x, torch.Tensor) else x for x in xs]


def test_tile_table_splits_each_sequence_from_its_start(device):
    cu = torch.tensor([0, 5, 5, 40, 41], dtype=torch.int32, device=device)  # includes an empty sequence
    start, s0, e0, P = _cpu(*_common.tile_table(cu, 41, 16))
    got = sorted((int(a), int(b), int(c)) for a, b, c in zip(start, s0, e0) if c > a)
    assert got == [(0, 0, 5), (5, 5, 40), (21, 5, 40), (37, 5, 40), (40, 40, 41)]
    assert P >= len(got)


def test_union_lists_and_reverse_index_match_brute_force(device):
    T, H, K, BS = 70, 2, 3, 16
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    bidx = random_block_idx(1, T, H, K, BS, cu)[0]  # [T, H, K]
    bidx[5, 0, 0] = bidx[5, 0, 1]  # a duplicate must count once
    tables = _common.tile_table(cu.to(device), T, 4)
    union, count = _cpu(*_common.union_lists(bidx.to(device), *tables[:3], 4, BS))
    start, s0, e0, P = _cpu(*tables)
    for p in range(P):
        toks = range(int(start[p]), int(e0[p])) if e0[p] > start[p] else []
        toks = [t for t in toks if t < int(start[p]) + 4]
        for h in range(H):
            want = sorted({int(b) for t in toks for b in bidx[t, h] if b >= 0})
            assert union[p, h, : count[p, h]].tolist() == want
            assert (union[p, h, count[p, h]:] == -1).all()

    tokens, offsets, C = _cpu(*_common.reverse_index(bidx.to(device), cu.to(device), BS))
    bstart, _, bend, _ = _cpu(*_common.tile_table(cu, T, BS))
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


@pytest.mark.parametrize("K", [4, 20])  # 20: slots padded to 32 in the key kernel, most of them -1
def test_split_index_matches_brute_force(device, K):
    # Work lists of the split schedule: (group, query chunk, key block) -> (token, sorted slot).
    T, H, BS, Tc = 70, 2, 8, 24
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    bidx = random_block_idx(1, T, H, K, BS, cu)[0]
    bidx[7, 1, 0] = bidx[7, 1, 1]  # a duplicate must count once
    bidx[50, 0, 0] = 9  # a block after the token's own one (future keys only) is dropped
    idx = _common.split_index(bidx.to(device), cu.to(device), BS, Tc)
    idx = idx._replace(**{f: getattr(idx, f).cpu() for f in ("tokens_E", "slots_E", "offsets", "valid_NHK")})
    bstart, _, bend, _ = _cpu(*_common.tile_table(cu, T, BS))
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


def test_tables_are_cached_with_their_cu_seqlens_and_rebuilt_after_an_in_place_change(device):
    # Every op of every MSA layer passes the forward's one cu_seqlens tensor: its tables are built once.
    cu = torch.tensor([0, 30, 70], dtype=torch.int32, device=device)
    first = _common.tile_table(cu, 70, 16)
    assert _common.tile_table(cu, 70, 16) is first
    assert _common.tile_table(cu, 70, 8) is not first  # another tile size: its own table
    bidx = random_block_idx(1, 70, 2, 3, 16, cu.cpu())[0].to(device)
    a = _common.split_index(bidx, cu, 16, 24)
    cu[1] = 40  # in place: the cached tables no longer describe it
    start, s0, e0, _ = _common.tile_table(cu, 70, 16)
    fresh = _common._tile_table(cu.clone(), 70, 16)
    assert all(torch.equal(x, y) for x, y in zip((start, s0, e0), fresh[:3]))
    assert int(s0[start == 40][0]) == 40  # a tile now starts where the second sequence does
    b = _common.split_index(bidx, cu, 16, 24)
    assert not torch.equal(a.offsets, b.offsets)
    again = _common.split_index(bidx, cu.clone(), 16, 24)  # the same values, nothing cached
    assert all(torch.equal(x, y) for x, y in zip(b[:4], again[:4]))
