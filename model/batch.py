"""The batch contract between the data pipeline and the model.

Legend: B rows per batch, T tokens per row, N image slots per row, C=3 channels, H=W image side.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from model.tokens import IGNORE_INDEX  # noqa: F401 (part of the batch contract)


@dataclass
class Batch:
    tokens_BT: torch.Tensor  # int64 [B, T] token ids; image patches hold the <|img_patch|> id
    targets_BT: torch.Tensor  # int64 [B, T] next-token ids; IGNORE_INDEX where not a text token
    positions_BT: torch.Tensor  # int64 [B, T] position inside the token's own document (RoPE)
    segment_ids_BT: torch.Tensor  # int32 [B, T] document number inside the row; attention never
    #                              crosses documents; padding is a segment of its own
    images_BNCHW: torch.Tensor  # uint8 [B, N, 3, H, W] the row's images in order, zero-padded
    n_images_B: torch.Tensor  # int32 [B] images used in each row
    answer_mask_BT: torch.Tensor  # bool [B, T] positions whose target is a retrieval answer token

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    @classmethod
    def from_dict(cls, d: dict) -> "Batch":
        """From the pipeline's column dict (numpy arrays or tensors), casting to the contract's dtypes."""
        def t(name, dtype):
            x = d[name]
            x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
            return x.to(dtype)

        return cls(
            tokens_BT=t("tokens", torch.int64),
            targets_BT=t("targets", torch.int64),
            positions_BT=t("positions", torch.int64),
            segment_ids_BT=t("segment_ids", torch.int32),
            images_BNCHW=t("images", torch.uint8),
            n_images_B=t("n_images", torch.int32),
            answer_mask_BT=t("answer_mask", torch.bool),
        )

    @property
    def n_text_targets(self) -> int:
        return int((self.targets_BT != IGNORE_INDEX).sum())
