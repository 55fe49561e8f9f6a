"""Grouped-query attention with RoPE, causal inside each packed document.

Legend: B batch rows, T tokens, Hq query heads, Hkv KV heads, D head dim, E d_model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.layers import apply_rope


def document_causal_mask(segment_ids_BT: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T]: key j visible to query t iff j <= t and both are in the same document."""
    T = segment_ids_BT.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=segment_ids_BT.device).tril()
    same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return (same_BTT & causal_TT)[:, None]


class DenseAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E, D = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(E, cfg.n_heads * D, bias=False)
        self.k_proj = nn.Linear(E, cfg.n_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(E, cfg.n_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * D, E, bias=False)

    def forward(self, x_BTE: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask_B1TT: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTE.shape
        cfg = self.cfg
        q_BTHD = apply_rope(self.q_proj(x_BTE).view(B, T, cfg.n_heads, cfg.head_dim), *rope)
        k_BTHD = apply_rope(self.k_proj(x_BTE).view(B, T, cfg.n_kv_heads, cfg.head_dim), *rope)
        v_BTHD = self.v_proj(x_BTE).view(B, T, cfg.n_kv_heads, cfg.head_dim)
        o_BHTD = F.scaled_dot_product_attention(
            q_BTHD.transpose(1, 2), k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2),
            attn_mask=mask_B1TT, enable_gqa=True,
        )
        return self.o_proj(o_BHTD.transpose(1, 2).reshape(B, T, -1))
