"""Grouped-query attention with RoPE, causal inside each packed document, and the document layout
that dense and sparse (MSA) attention share.

Legend: B batch rows, T tokens per row, N = B*T flat tokens, S documents (sequences) over all rows,
Hq query heads, Hkv KV heads, D head dim, E d_model.

Document semantics (the same for every attention path): a document is a maximal run of equal
segment ids inside a row; a token attends to the keys of its own document at or before it.
Padding (segment 0) runs are documents of their own, so they never leak into real documents; their
targets are ignored. The MSA kernels take this as the packed varlen form (B=1, `cu_seqlens` over all
documents of all rows), so key blocks are counted from each document's start.

When every row holds exactly one document (the long-context benchmark's case, and any batch of
unpacked documents), the document mask is plain causal attention: `scaled_dot_product_attention`
with `is_causal=True`, which runs cuDNN's (preferred on CUDA: 1.7x flash at 32K on the H100) or
flash attention, the fastest dense attention for that mask. Packed rows need the document mask;
there full attention has two implementations, chosen by `model.dense_impl` (the semantics are
identical, tested in tests/model/test_attention.py):
  * "sdpa": `scaled_dot_product_attention` with a boolean [B, 1, T, T] mask. Simple and exact; fine
    on CPU and at a few thousand tokens, but the mask is T^2 bytes per row (1 GiB at 32K).
  * "flex": FlexAttention with a document-causal BlockMask, built once per forward from the
    document ids (no [T, T] tensor), compiled on CUDA. The long-context GPU path (`small` preset).
  * "varlen": flash attention over the packed documents (`torch.nn.attention.varlen.varlen_attn`,
    causal, `cu_seqlens` as the MSA kernels take them): no mask at all, each document its own
    causal sequence. CUDA and bf16/fp16 inputs only (flash attention's); no host sync (the longest
    document is bounded by the row length, known on the host), so a CUDA graph can capture it.

    pytest -q tests/model/test_attention.py
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import fused
from model.config import ModelConfig


@dataclass
class DocLayout:
    """Where the documents are, computed once per forward from `segment_ids_BT`."""

    B: int
    T: int
    doc_BT: torch.Tensor  # int64 [B, T] global document number (increasing along the flat axis)
    cu_seqlens: torch.Tensor  # int32 [S+1] document boundaries on the flat N = B*T axis
    pos_N: torch.Tensor  # int64 [N] position of the token inside its document (0-based)
    valid_N: torch.Tensor  # bool [N] not padding (segment id != 0)
    seq_valid_S: torch.Tensor  # bool [S] the document is not a padding run (nor an empty slot)
    real_docs: int  # the batch's documents (S may be more: `doc_slots` adds empty ones at the end)

    @staticmethod
    def _starts(segment_ids_BT: torch.Tensor) -> torch.Tensor:
        """bool [N]: a document starts here (a new segment id, or a new row)."""
        T = segment_ids_BT.shape[1]
        seg_N = segment_ids_BT.reshape(-1)
        flat_N = torch.arange(seg_N.numel(), device=seg_N.device)
        start_N = torch.ones_like(seg_N, dtype=torch.bool)
        start_N[1:] = (seg_N[1:] != seg_N[:-1]) | (flat_N[1:] % T == 0)
        return start_N

    @classmethod
    def count_documents(cls, segment_ids_BT: torch.Tensor) -> int:
        """S, the documents of a batch (where its segment ids are on the host: model/batch.py)."""
        return int(cls._starts(segment_ids_BT).sum())

    @classmethod
    def from_segments(cls, segment_ids_BT: torch.Tensor, n_docs: int | None = None,
                      doc_slots: int | None = None) -> "DocLayout":
        """n_docs (from `count_documents` on the host copy): no host sync here; without it, one.

        doc_slots (>= n_docs): the layout has this many documents, the ones after the batch's own
        empty (zero length, at the end of the flat axis, not valid). Every kernel and statistic gives
        the same result with them; what it buys is a shape that depends on the slots, not on the
        batch, so one captured training step serves every batch whose documents fit them
        (pipeline/graphs.py)."""
        B, T = segment_ids_BT.shape
        dev = segment_ids_BT.device
        seg_N = segment_ids_BT.reshape(-1)
        N = seg_N.numel()
        flat_N = torch.arange(N, device=dev)
        start_N = cls._starts(segment_ids_BT)
        doc_N = torch.cumsum(start_N.long(), 0) - 1
        if n_docs is None:
            if doc_slots is not None:
                raise ValueError("doc_slots needs the batch's document count (n_docs)")
            starts_S = flat_N[start_N]  # one host sync: the number of documents
        else:
            slots = n_docs if doc_slots is None else doc_slots
            if slots < n_docs:
                raise ValueError(f"doc_slots={slots} is fewer than the batch's {n_docs} documents")
            # the empty slots start (and end) at N
            starts_S = torch.nonzero_static(start_N, size=slots, fill_value=N)[:, 0]
        cu = torch.cat([starts_S, starts_S.new_full((1,), N)]).to(torch.int32)  # (no host-to-device copy)
        pos_N = flat_N - starts_S[doc_N]
        seq_valid_S = (seg_N[starts_S.clamp(max=N - 1)] != 0) & (starts_S < N)
        return cls(B=B, T=T, doc_BT=doc_N.view(B, T), cu_seqlens=cu, pos_N=pos_N, valid_N=seg_N != 0,
                   seq_valid_S=seq_valid_S, real_docs=starts_S.numel() if n_docs is None else n_docs)

    @property
    def n_docs(self) -> int:
        return self.cu_seqlens.numel() - 1


class DenseMask:
    """The document-causal mask in the form `dense_impl` needs, built lazily once per forward."""

    def __init__(self, layout: DocLayout, impl: str, document_mask: bool = False):
        self.layout, self.impl = layout, impl
        # one document per row: the mask is plain causal (known on the host, no sync); document_mask
        # keeps the document-mask path anyway (model/batch.py: Batch.document_mask)
        self.causal_only = layout.real_docs == layout.B and not document_mask
        self._mask = None

    def get(self):
        if self._mask is None:
            doc_BT = self.layout.doc_BT
            if self.impl == "sdpa":
                T = doc_BT.shape[1]
                causal_TT = torch.ones(T, T, dtype=torch.bool, device=doc_BT.device).tril()
                self._mask = ((doc_BT[:, :, None] == doc_BT[:, None, :]) & causal_TT)[:, None]
            else:
                self._mask = _flex_block_mask(doc_BT)
        return self._mask


def _flex_block_mask(doc_BT: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def document_causal(b, h, q_idx, kv_idx):
        return (doc_BT[b, q_idx] == doc_BT[b, kv_idx]) & (q_idx >= kv_idx)

    B, T = doc_BT.shape
    # compiled on CUDA so the mask is evaluated block by block, never as a [B, T, T] tensor
    return create_block_mask(document_causal, B, None, T, T, device=doc_BT.device,
                             _compile=doc_BT.device.type == "cuda")


_compiled_flex = None


def _flex_attention(q_BHTD, k_BHTD, v_BHTD, block_mask):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q_BHTD.device.type != "cuda":
        # eager FlexAttention (materialises scores; CPU tests and debugging only)
        return flex_attention(q_BHTD, k_BHTD, v_BHTD, block_mask=block_mask, enable_gqa=True)
    if _compiled_flex is None:
        # FlexAttention is only fast compiled; compiled once per process, reused by every layer
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q_BHTD, k_BHTD, v_BHTD, block_mask=block_mask, enable_gqa=True)


_CAUSAL_BACKENDS = None


def _causal_sdpa(q_BHTD, k_BHTD, v_BHTD):
    """Causal GQA attention through SDPA, cuDNN first on CUDA (then flash, memory-efficient, math)."""
    global _CAUSAL_BACKENDS
    if q_BHTD.device.type != "cuda":
        return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, is_causal=True, enable_gqa=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if _CAUSAL_BACKENDS is None:
        _CAUSAL_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(_CAUSAL_BACKENDS, set_priority=True):
        return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, is_causal=True, enable_gqa=True)


@functools.cache
def _varlen_kwargs(varlen_attn) -> dict:
    """Causal (and GQA) in the form this torch's varlen_attn takes: torch 2.10 has is_causal, later
    releases a (left, right) window, (-1, 0) meaning causal."""
    params = inspect.signature(varlen_attn).parameters
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return kwargs


def _varlen_flash(q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor, layout: DocLayout) -> torch.Tensor:
    """Document-causal GQA attention as flash attention over the packed documents; o [B, T, Hq, D]."""
    if q_BTHD.device.type != "cuda" or q_BTHD.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"model.dense_impl = 'varlen' runs flash attention, which needs CUDA tensors in bf16 or "
                         f"fp16 (train.dtype); got {q_BTHD.dtype} on {q_BTHD.device.type}. Use 'sdpa' on the CPU "
                         f"or 'flex'.")
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        raise ValueError(f"model.dense_impl = 'varlen' needs torch.nn.attention.varlen (torch >= 2.10); this is "
                         f"torch {torch.__version__}") from e
    B, T, Hq, D = q_BTHD.shape
    cu = layout.cu_seqlens  # documents never span rows, so no document is longer than T
    q_NHD, k_NHD, v_NHD = (x.reshape(B * T, x.shape[2], D) for x in (q_BTHD, k_BTHD, v_BTHD))
    o_NHD = varlen_attn(q_NHD, k_NHD, v_NHD, cu, cu, T, T, **_varlen_kwargs(varlen_attn))
    return o_NHD.view(B, T, Hq, D)


def dense_attention(q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor, mask: DenseMask) -> torch.Tensor:
    """Document-causal full GQA attention; o [B, T, Hq, D]."""
    if mask.impl == "varlen" and not mask.causal_only:
        return _varlen_flash(q_BTHD, k_BTHD, v_BTHD, mask.layout)
    q, k, v = (x.transpose(1, 2) for x in (q_BTHD, k_BTHD, v_BTHD))
    if mask.causal_only:
        o_BHTD = _causal_sdpa(q, k, v)
    elif mask.impl == "sdpa":
        o_BHTD = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.get(), enable_gqa=True)
    else:
        o_BHTD = _flex_attention(q, k, v, mask.get())
    return o_BHTD.transpose(1, 2)


@dataclass
class AttnContext:
    """What every attention layer needs for one forward, computed once."""

    layout: DocLayout
    mask: DenseMask
    rope: tuple[torch.Tensor, torch.Tensor]  # cos/sin [B, T, rope_dim/2]
    mode: str  # "dense" | "warmup" | "sparse" (MSA layers; dense layers ignore it)
    compute_stats: bool
    index_loss: bool = True  # MSA layers compute the KL (False: evaluation, which has no use for it)
    budget_param: float | None = None  # the adaptive budget's ratio or p in place of the config's


class GQAAttention(nn.Module):
    """The main branch: q/k/v/o projections, RoPE, full document-causal attention.

    MSA layers (model/msa.py) subclass it, so the backbone's parameter names are the same in dense
    and MSA models (what retrofitting relies on).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E, D = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(E, cfg.n_heads * D, bias=False)
        self.k_proj = nn.Linear(E, cfg.n_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(E, cfg.n_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * D, E, bias=False)

    def qkv(self, x_BTE: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x_BTE.shape
        cfg = self.cfg
        q_BTHD, k_BTHD = fused.rope_pair(self.q_proj(x_BTE).view(B, T, cfg.n_heads, cfg.head_dim),
                                         self.k_proj(x_BTE).view(B, T, cfg.n_kv_heads, cfg.head_dim), *rope)
        v_BTHD = self.v_proj(x_BTE).view(B, T, cfg.n_kv_heads, cfg.head_dim)
        return q_BTHD, k_BTHD, v_BTHD

    def forward(self, x_BTE: torch.Tensor, ctx: AttnContext) -> tuple[torch.Tensor, dict]:
        """Returns the attention output [B, T, E] and this layer's extras (none for a dense layer)."""
        B, T, _ = x_BTE.shape
        q_BTHD, k_BTHD, v_BTHD = self.qkv(x_BTE, ctx.rope)
        o_BTHD = dense_attention(q_BTHD, k_BTHD, v_BTHD, ctx.mask)
        return self.o_proj(o_BTHD.reshape(B, T, -1)), {}
