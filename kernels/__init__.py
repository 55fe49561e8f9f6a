"""MiniMax Sparse Attention (MSA) kernels: block selection, block-sparse GQA attention and the KL
alignment loss, each a Triton path with a plain-PyTorch fp32 reference beside it.

    block_idx, index_lse = msa_select(qi, ki, block_size, topk, cu_seqlens=None, budget=None)
    o, lse = msa_attention(q, k, v, block_idx, block_size, cu_seqlens=None, softmax_scale=None)
    kl = msa_kl_loss(q, k, qi, ki, block_idx, block_size, cu_seqlens=None, lse=None, index_lse=None)

Every function takes `backend="triton"` (default) or `backend="reference"`. On CPU the Triton path
needs TRITON_INTERPRET=1 set before `kernels` is imported. See kernels/README.md.
"""
from kernels.attention import msa_attention
from kernels.kl import msa_kl_loss
from kernels.select import Budget, msa_select

__all__ = ["msa_select", "msa_attention", "msa_kl_loss", "Budget"]
