"""Small helpers shared by the MSA Triton paths (never by the references): input checks, the
packed-sequence tables the kernels walk, the key-block -> query reverse index, output allocation.

Not a runnable module; `kernels/<op>/op.py` imports it. Its own tests: `pytest -q tests/kernels/test_msa_common.py`.

Every kernel works on a flat token axis: `[B, T, ...]` inputs are viewed as `[1, B*T, ...]` with
`cu_seqlens = [0, T, 2T, ..., B*T]`, so batch rows and packed sequences are the same case.

Shape legend (suffixes of tensor names):
    B batch, T tokens per row, N = B*T flat tokens, S sequences (cu_seqlens has S+1 entries),
    H KV heads = GQA groups = index heads, K top-k slots, P tiles of consecutive query tokens,
    C key blocks over all sequences, U slots of a tile's union of selected blocks, E reverse-index entries.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

BACKENDS = ("triton", "reference")
SCHEDULES = ("query", "split")  # of msa_attention and msa_kl_loss; see kernels/attention/README.md
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the ops accept

# The kernels' softmaxes run in base 2: exp(x) = exp2(x * LOG2E), ln(y) = log2(y) * LN2. The ops
# fold LOG2E into the scales they pass; @triton.jit code reads the `_C` forms, because a global
# inside jit code must be a tl.constexpr (a plain float works in the interpreter and fails to
# compile: docs/traps.md).
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)


@triton.jit
def _probe_kernel(x_ptr):
    pass


# The interpreter is chosen when `@triton.jit` runs, i.e. when `kernels` is imported; setting
# TRITON_INTERPRET later changes nothing, so remember what the kernels were built as.
INTERPRETED = type(_probe_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------------------
# Output allocation (tests poison outputs with NaN so that an element a kernel forgot fails loudly)
# ---------------------------------------------------------------------------------------------
_POISON = os.environ.get("MSA_POISON_OUTPUTS", "0") == "1"


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Inside this context every buffer a kernel must fully write starts as NaN (ints as -2)."""
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a buffer that a kernel overwrites completely."""
    if not _POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -2
    return torch.full(shape, fill, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def check_backend(backend: str, device: torch.device, *dtypes: torch.dtype) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    if backend != "triton":
        return
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "backend='triton' got CPU tensors, but the Triton kernels were not built for the "
            "interpreter: set TRITON_INTERPRET=1 before importing `kernels`, or pass backend='reference'"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend='triton' needs CUDA (or CPU with TRITON_INTERPRET=1) tensors, got {device}")
    if device.type == "cpu" and torch.bfloat16 in dtypes:
        # The interpreter's bf16 tl.dot returns garbage (seen with triton 3.8): refuse, do not mislead.
        raise TypeError("bf16 inputs are not supported by the Triton interpreter on CPU (its bf16 dot is wrong); "
                        "use fp32/fp16 there, or backend='reference'")


def check_size(name: str, x: torch.Tensor) -> None:
    # Kernel offsets are 32-bit.
    if x.numel() >= 2**31:
        raise ValueError(f"{name} has {x.numel()} elements; the kernels use 32-bit offsets (< 2**31)")


def check_tensor(name: str, x, ndim: int, dtypes, device=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (like the other inputs)")


def check_last_dim_contiguous(name: str, x: torch.Tensor) -> None:
    # The kernels take strides for the token and head axes but assume unit stride along the
    # feature axis (vectorised loads), and the flat token view needs B and T to merge.
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {x.stride(-1)}); call .contiguous()")


def check_block_size(block_size) -> None:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")


def check_head_dim(name: str, d: int) -> None:
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"{name} must be a power of two in [16, 256], got {d}")


def check_cu_seqlens(cu_seqlens, B: int, T: int, device) -> None:
    if cu_seqlens is None:
        return
    check_tensor("cu_seqlens", cu_seqlens, 1, (torch.int32,), device)
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (sequences packed along T), got batch {B}")
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must hold at least [0, T]")
    # Value checks without a host sync: on CUDA a violation is a device-side assert. Queued once per
    # tensor (every op of every MSA layer in a forward passes the same one).
    cu = cu_seqlens
    tables = cu_tables(cu)
    if tables.get("checked_T") != T:
        torch._assert_async(cu[0] == 0, "cu_seqlens[0] must be 0")
        torch._assert_async(cu[-1] == T, "cu_seqlens[-1] must equal T")
        torch._assert_async(torch.all(cu[1:] >= cu[:-1]), "cu_seqlens must be non-decreasing")
        tables["checked_T"] = T


def flat_cu_seqlens(B: int, T: int, cu_seqlens, device) -> torch.Tensor:
    """cu_seqlens of the flat token axis: the given one, or one sequence per batch row (one tensor
    per (B, T, device), so the tables built from it are cached with it; see `cu_tables`)."""
    if cu_seqlens is not None:
        return cu_seqlens
    return _batch_cu(B, T, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _batch_cu(B: int, T: int, device: str) -> torch.Tensor:
    return torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)


def cu_tables(cu_S1: torch.Tensor) -> dict:
    """The cache of tables that depend on one cu_seqlens tensor alone (tile tables, the per-token
    parts of the work lists, whether its checks were queued), kept on the tensor itself.

    Why: every op of every MSA layer in a forward, and their backwards, pass the same cu_seqlens
    tensor. Built per op and layer, these tables were about 190 of the 280 small launches an MSA
    layer's forward made besides its kernels (counted on the CPU), and at 8K tokens a training step
    waits on the host for such launches (docs/perf/steps_h200.md). The cache lives and dies with the
    tensor; an in-place change of it (its version counter moves) starts a new one. Cached tensors are
    only ever read. Inference tensors have no version counter: their tables are built each time."""
    if cu_S1.is_inference():
        return {}
    cache = cu_S1.__dict__.get("_msa_tables")
    if cache is None or cache["version"] != cu_S1._version:
        cache = {"version": cu_S1._version}
        cu_S1._msa_tables = cache
    return cache


# ---------------------------------------------------------------------------------------------
# Tables the kernels walk
# ---------------------------------------------------------------------------------------------
def tile_table(cu_S1: torch.Tensor, N: int, tile: int):
    """Split every sequence into tiles of `tile` consecutive tokens, counted from its start.

    Returns (start_P, seq_start_P, seq_end_P) int32 and P. P is an upper bound
    (cdiv(N, tile) + S) so that no host sync is needed; unused tiles have start = seq_end = 0
    and therefore no valid rows. With tile = block_size these are exactly the key blocks.
    """
    tables = cu_tables(cu_S1)
    key = ("tiles", N, tile)
    if key not in tables:
        tables[key] = _tile_table(cu_S1, N, tile)
    return tables[key]


def _tile_table(cu_S1: torch.Tensor, N: int, tile: int):
    S = cu_S1.numel() - 1
    P = triton.cdiv(N, tile) + S
    cu = cu_S1.long()
    n_tiles_S = (cu[1:] - cu[:-1] + tile - 1) // tile
    end_S = torch.cumsum(n_tiles_S, 0)
    tile_P = torch.arange(P, device=cu.device)
    seq_P = torch.searchsorted(end_S, tile_P, right=True)
    valid_P = seq_P < S
    seq_P = seq_P.clamp(max=S - 1)
    first_P = end_S[seq_P] - n_tiles_S[seq_P]
    start_P = cu[seq_P] + (tile_P - first_P) * tile
    zero = torch.zeros_like(start_P)
    start_P = torch.where(valid_P, start_P, zero).to(torch.int32)
    seq_start_P = torch.where(valid_P, cu[seq_P], zero).to(torch.int32)
    seq_end_P = torch.where(valid_P, cu[seq_P + 1], zero).to(torch.int32)
    return start_P, seq_start_P, seq_end_P, P


def union_lists(block_idx_NHK: torch.Tensor, start_P, seq_start_P, seq_end_P, tokens_per_tile: int,
                block_size: int):
    """Per (tile, group): the sorted set of blocks selected by any token of the tile.

    Returns union_PHU int32 (padded with -1) and count_PH int32. Duplicates inside one token's
    list are removed too, so a repeated block is attended once (the selection is a set). Blocks
    after the tile's local block hold only future keys and are dropped (this also keeps a bad
    index from turning into an out-of-range address). Needs tokens_per_tile | block_size, so
    that all tokens of a tile share their local block.
    """
    N, H, K = block_idx_NHK.shape
    TM = tokens_per_tile
    P = start_P.numel()
    tok_PM = start_P.long()[:, None] + torch.arange(TM, device=start_P.device)
    valid_PM = tok_PM < seq_end_P.long()[:, None]
    tok_PM = torch.where(valid_PM, tok_PM, torch.zeros_like(tok_PM))
    b_PMHK = block_idx_NHK[tok_PM].long()
    big = torch.iinfo(torch.int32).max
    local_P = (start_P.long() - seq_start_P.long()) // block_size
    ok = valid_PM[:, :, None, None] & (b_PMHK >= 0) & (b_PMHK <= local_P[:, None, None, None])
    b_PMHK = torch.where(ok, b_PMHK, big)
    b_PHU = b_PMHK.permute(0, 2, 1, 3).reshape(P, H, TM * K)
    b_PHU, _ = torch.sort(b_PHU, dim=-1)
    dup = torch.zeros_like(b_PHU, dtype=torch.bool)
    dup[..., 1:] = b_PHU[..., 1:] == b_PHU[..., :-1]
    b_PHU = torch.where(dup, big, b_PHU)
    b_PHU, _ = torch.sort(b_PHU, dim=-1)
    count_PH = (b_PHU != big).sum(-1).to(torch.int32)
    union_PHU = torch.where(b_PHU == big, -1, b_PHU).to(torch.int32).contiguous()
    return union_PHU, count_PH.contiguous()


def reverse_index(block_idx_NHK: torch.Tensor, cu_S1: torch.Tensor, block_size: int):
    """Key block -> query tokens that selected it, for deterministic dK/dV-style backward passes.

    Key blocks are numbered globally (c = first block of the token's sequence + local block), in
    the order of `tile_table(cu, N, block_size)`. Returns
        tokens_E int32: query tokens grouped by (group h, block c), ascending within a group;
        offsets int32 [H*C + 1]: entries of (h, c) are tokens_E[offsets[h*C+c] : offsets[h*C+c+1]];
        C (the block table's size).
    A token's duplicate entries, entries of -1 and blocks after the token's own block (only
    future keys) are dropped.
    """
    idx = split_index(block_idx_NHK, cu_S1, block_size, chunk_tokens=None)
    return idx.tokens_E, idx.offsets, idx.C


class SplitIndex(NamedTuple):
    """The reverse index of `split_index` (see there)."""
    tokens_E: torch.Tensor
    slots_E: torch.Tensor
    offsets: torch.Tensor
    valid_NHK: torch.Tensor
    C: int
    n_chunks: int
    chunk_tokens: int


def split_index(block_idx_NHK: torch.Tensor, cu_S1: torch.Tensor, block_size: int, chunk_tokens: int | None):
    """Key block -> (query token, slot) pairs that selected it, grouped by (group h, chunk of
    query tokens, key block c): the work lists of the key-block-stationary kernels.

    Query tokens are cut into chunks of `chunk_tokens` consecutive flat tokens (None: one chunk), so
    that one (chunk, block) list touches a bounded set of queries (they stay in L2) and long lists
    (the early blocks that every later token may select) are split for load balance. Key blocks are
    numbered globally as in `tile_table(cu, N, block_size)`. Returns a SplitIndex:
        tokens_E, slots_E int32: the pairs, grouped by item = (h * n_chunks + chunk) * C + c, and
            ascending by token inside an item; slot is the position in the token's selection
            *sorted ascending* (the slot axis of the partial-result buffers);
        offsets int32 [H * n_chunks * C + 1]: item i holds entries offsets[i] : offsets[i+1];
        valid_NHK int8 [N, H, K]: 1 where a sorted slot holds a pair (so a merge knows which
            partials exist);
        C, n_chunks, chunk_tokens.
    A token's duplicate entries, entries of -1 and blocks after the token's own block (only future
    keys) are dropped.
    """
    N, H, K = block_idx_NHK.shape
    Tc = N if chunk_tokens is None else int(chunk_tokens)
    Tc = max(1, Tc)
    C, NCH, local_N, base_N, bounds = _split_tables(cu_S1, N, H, block_size, Tc)
    n_items = H * NCH * C
    dev = block_idx_NHK.device
    # Per (token, group): each entry's item key at its sorted slot (n_items where the slot holds no
    # pair), and which sorted slots hold one: one kernel, where the same in PyTorch is about 15
    # small launches per call (two calls per MSA layer and forward; docs/perf/steps_h200.md).
    item_NHK = empty((N, H, K), torch.int32, dev)
    valid_NHK = empty((N, H, K), torch.int8, dev)
    KP = next_pow2(K)
    BN = max(1, 2048 // (KP * KP))
    split_keys_kernel[(triton.cdiv(N, BN), H)](
        block_idx_NHK, local_N, base_N, item_NHK, valid_NHK, N, NCH * C, n_items,
        block_idx_NHK.stride(0), block_idx_NHK.stride(1), block_idx_NHK.stride(2),
        H=H, K=K, KP=KP, BN=BN,
    )
    # A stable sort by item keeps the (token, slot) order of the flat [N, H, K] layout inside an
    # item, i.e. tokens ascending; 32-bit keys sort about twice as fast as composite 64-bit ones.
    item_E, flat_E = torch.sort(item_NHK.view(-1), stable=True)
    E = flat_E.numel()
    tokens_E, slots_E = empty((E,), torch.int32, dev), empty((E,), torch.int32, dev)
    split_pairs_kernel[(triton.cdiv(E, 1024),)](flat_E, tokens_E, slots_E, E, H * K, K, BE=1024)
    offsets = torch.searchsorted(item_E, bounds, out_int32=True)
    return SplitIndex(tokens_E, slots_E, offsets, valid_NHK, C, NCH, Tc)


@triton.jit
def split_keys_kernel(b_ptr, local_ptr, base_ptr, item_ptr, valid_ptr, N, items_per_group, n_items,
                      stride_bn, stride_bh, stride_bk,
                      H: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr):
    """Program (token tile, group h). For each token's K entries b_j: valid_j = b_j >= 0, not after
    the token's own block, and not a repeat of an earlier slot's block; its sorted slot is
    #{i: b_i < b_j} (the place of its first copy in the ascending sort, -1s and all). Writes, per
    sorted slot p, the item key of the valid entry that sorts there (else n_items) and valid[p]."""
    h = tl.program_id(1)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    j = tl.arange(0, KP)
    n_ok = n < N
    j_ok = j < K
    m = n_ok[:, None] & j_ok[None, :]
    b = tl.load(b_ptr + n[:, None] * stride_bn + h * stride_bh + j[None, :] * stride_bk, mask=m, other=0)
    local = tl.load(local_ptr + n, mask=n_ok, other=0)
    base = tl.load(base_ptr + n, mask=n_ok, other=0) + h * items_per_group
    # [BN, i, j]: entry i against entry j of the same token (padded slots i >= K never count)
    b_i = b[:, :, None]
    b_j = b[:, None, :]
    i_ok = (j < K)[None, :, None]
    earlier = (j[:, None] < j[None, :])[None, :, :]
    repeat_j = tl.max(((b_i == b_j) & earlier & i_ok).to(tl.int32), axis=1) > 0
    rank_j = tl.sum(((b_i < b_j) & i_ok).to(tl.int32), axis=1)
    valid_j = m & (b >= 0) & (b <= local[:, None]) & (repeat_j == 0)
    # [BN, p, j]: the valid entry whose rank is p (distinct valid blocks have distinct ranks)
    at_p = (rank_j[:, None, :] == j[None, :, None]) & valid_j[:, None, :]
    has_p = tl.max(at_p.to(tl.int32), axis=2)
    key_p = tl.max(tl.where(at_p, base[:, None, None] + b[:, None, :], -1), axis=2)
    key_p = tl.where(has_p > 0, key_p, n_items)
    out = n[:, None] * (H * K) + h * K + j[None, :]
    tl.store(item_ptr + out, key_p, mask=m)
    tl.store(valid_ptr + out, has_p.to(tl.int8), mask=m)


@triton.jit
def split_pairs_kernel(flat_ptr, tok_ptr, slot_ptr, E, HK, K, BE: tl.constexpr):
    """Flat [N, H, K] positions -> (token, sorted slot)."""
    e = tl.program_id(0) * BE + tl.arange(0, BE)
    ok = e < E
    flat = tl.load(flat_ptr + e, mask=ok, other=0)
    tl.store(tok_ptr + e, (flat // HK).to(tl.int32), mask=ok)
    tl.store(slot_ptr + e, (flat % K).to(tl.int32), mask=ok)


def _split_tables(cu_S1: torch.Tensor, N: int, H: int, block_size: int, Tc: int):
    """The parts of `split_index` that depend on cu_seqlens alone (cached with it, `cu_tables`):
    C, n_chunks, each token's local block and its item base (chunk * C + its sequence's first
    block; int32 [N]), and the item bounds that `searchsorted` turns into offsets."""
    tables = cu_tables(cu_S1)
    key = ("split", N, H, block_size, Tc)
    if key not in tables:
        dev = cu_S1.device
        S = cu_S1.numel() - 1
        C = triton.cdiv(N, block_size) + S
        NCH = triton.cdiv(N, Tc)
        if H * NCH * C >= 2**31 - 1:
            raise ValueError(f"{H * NCH * C} work-list items (groups x query chunks x key blocks) "
                             "do not fit the 32-bit keys of the work lists")
        cu = cu_S1.long()
        n_blocks_S = (cu[1:] - cu[:-1] + block_size - 1) // block_size
        first_block_S = torch.cumsum(n_blocks_S, 0) - n_blocks_S
        tok_N = torch.arange(N, device=dev)
        seq_N = torch.searchsorted(cu[1:], tok_N, right=True).clamp(max=S - 1)
        local_N = ((tok_N - cu[seq_N]) // block_size).to(torch.int32)
        base_N = ((tok_N // Tc) * C + first_block_S[seq_N]).to(torch.int32)
        bounds = torch.arange(H * NCH * C + 1, device=dev, dtype=torch.int32)
        tables[key] = (C, NCH, local_N, base_N, bounds)
    return tables[key]


# Set by `scripts/compile_check.py`: compile the GPU specialisations for CPU tensors without a GPU.
COMPILE_ONLY = False


def gpu_launch(x: torch.Tensor) -> bool:
    """Whether launch parameters are for a GPU (else the interpreter's)."""
    return x.device.type == "cuda" or COMPILE_ONLY


def launch_config(table: dict, kernel: str, x: torch.Tensor, block_size: int, rows: int = 16,
                  constexprs: dict | None = None) -> dict:
    """Launch parameters of one kernel: the op's GPU table entry, or whole blocks per step in the
    interpreter (fewer Python-level iterations; warps and stages are ignored there).

    constexprs maps table keys to the kernel's constexpr names (code-path switches such as a
    prefetch, cache hints): they are passed under those names on the GPU and in the interpreter
    alike, so the interpreter runs the same code path. The table is read at call time:
    `benchmarks/msa_kernels.py` and the tests override it to compare variants."""
    entry = table[kernel]
    if not gpu_launch(x):
        cfg = {"BN": block_size}
        if "rows" in entry:  # the key-block kernels' query rows per step
            cfg["rows"] = 16
    else:
        cfg = dict(entry)
        cfg["BN"] = min(cfg["BN"], block_size)
        if rows >= 128:  # wide tiles (tokens_per_tile x G >= 128 rows): fp32 accumulators need 8 warps
            cfg["num_warps"] = max(cfg["num_warps"], 8)
        if x.element_size() == 4:
            # fp32 inputs (IEEE products, a correctness path: no tensor cores) take twice the shared
            # memory of bf16 per tile: without pipelining stages and with half the rows per step they
            # fit a block's 227 KiB at dh = dI = block = 128 (scripts/compile_check.py checks it)
            cfg["num_stages"] = 1
            if "rows" in cfg:
                cfg["rows"] = max(16, cfg["rows"] // 2)
    for key, name in (constexprs or {}).items():
        cfg.pop(key, None)
        if key in entry:
            cfg[name] = entry[key]
    return cfg


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through TF32 on the GPU (10-bit mantissa).
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def tile_rows(tokens: int, G: int) -> int:
    """Rows of a program step holding `tokens` tokens x G heads, padded to a power of two of at
    least 16 (the smallest tensor-core tile)."""
    return max(16, next_pow2(tokens * G))


def step_rows(rows: int, G: int):
    """(tokens per step, padded rows per step) for a step of about `rows` query rows of G heads each."""
    tokens = max(1, rows // G)
    return tokens, tile_rows(tokens, G)


def split_chunk_tokens(n_tokens: int) -> int:
    """Default query chunk of the split schedules (`split_index`): about 16 chunks (enough
    (chunk, block) work lists to fill the GPU at 8K, few enough that per-chunk dK/dV partials stay
    small), each small enough that its queries stay in L2 (measured in docs/perf/kernels_notes.md)."""
    return min(16384, max(256, next_pow2(-(-n_tokens // 16))))
