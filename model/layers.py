"""Building blocks: RMSNorm, rotary embeddings, the SwiGLU feed-forward, the image patch encoder.

Legend: B batch rows, T tokens, H heads, D head dim, M images, P patches per image, E d_model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalize in fp32: bf16 sums of squares lose too much at large d_model
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_cos_sin(positions_BT: torch.Tensor, rope_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, T, rope_dim/2] for integer positions (positions restart in every document)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, device=positions_BT.device, dtype=torch.float32) / rope_dim))
    ang_BTF = positions_BT.float()[..., None] * inv_freq
    return ang_BTF.cos(), ang_BTF.sin()


def apply_rope(x_BTHD: torch.Tensor, cos_BTF: torch.Tensor, sin_BTF: torch.Tensor) -> torch.Tensor:
    """Rotate the first rope_dim dims of each head (partial RoPE when rope_dim < D); half-split pairing."""
    rd = cos_BTF.shape[-1] * 2
    x_rot, x_pass = x_BTHD[..., :rd].float(), x_BTHD[..., rd:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    cos, sin = cos_BTF[:, :, None, :], sin_BTF[:, :, None, :]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x_BTHD.dtype)
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


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
