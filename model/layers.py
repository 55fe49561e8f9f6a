"""Building blocks: RMSNorm, rotary embeddings, the SwiGLU feed-forward, the image patch encoder.

Legend: B batch rows, T tokens, H heads, D head dim, M images, P patches per image, E d_model.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from model import fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps)  # in fp32, fused on CUDA (model/fused.py)


def rope_cos_sin(positions_BT: torch.Tensor, rope_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, T, rope_dim/2] for integer positions (positions restart in every document)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, device=positions_BT.device, dtype=torch.float32) / rope_dim))
    ang_BTF = positions_BT.float()[..., None] * inv_freq
    return ang_BTF.cos(), ang_BTF.sin()


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(fused.silu_mul(self.w_gate(x), self.w_up(x)))


class PatchEncoder(nn.Module):
    """Images -> patch embeddings, trained from scratch with the rest of the model ("native" fusion).

    A strided convolution is a linear map of each non-overlapping patch; a learned embedding of the
    patch's place in the grid tells the model where in the image it is.
    """

    # per-channel statistics of natural images (ImageNet); only a fixed input scaling
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, image_size: int, patch_size: int, d_model: int):
        super().__init__()
        self.proj = nn.Conv2d(3, d_model, kernel_size=patch_size, stride=patch_size)
        n = (image_size // patch_size) ** 2
        self.pos_PE = nn.Parameter(torch.zeros(n, d_model))
        self.norm = RMSNorm(d_model)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images_MCHW: torch.Tensor) -> torch.Tensor:
        x = (images_MCHW.float() / 255.0 - self.mean) / self.std
        x_MEhw = self.proj(x.to(self.proj.weight.dtype))
        x_MPE = x_MEhw.flatten(2).transpose(1, 2)
        return self.norm(x_MPE + self.pos_PE)
