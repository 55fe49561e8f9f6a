"""The batch contract between the data pipeline and the model.

Legend: B rows per batch, T tokens per row, N image slots per row, C=3 channels, H=W image side.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

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
    # Counted on the host where the batch is made (`from_dict`, `with_counts`), so that the forward
    # never reads its device copy back to size a tensor (a host sync that would make the host wait for
    # the GPU's previous step); None: the forward counts on the device itself.
    n_docs: int | None = None  # documents over all rows (model/attention.py: DocLayout)
    n_images: int | None = None  # images used over all rows
    n_patch_tokens: int | None = None  # tokens that hold the <|img_patch|> id
    # Shapes fixed by the batch's size rather than its contents (`fixed_shapes`), for a training step
    # captured once and replayed for every batch (pipeline/graphs.py); None: sized by the counts.
    doc_slots: int | None = None  # documents in the layout (>= n_docs; the rest empty)
    image_slots: int | None = None  # images through the patch encoder (>= n_images; the rest unused)
    # the dense layers take the document-mask path even when every row is one document (the same
    # result: benchmarks time that path; under DDP with CUDA graphs the ranks' steps share one layout)
    document_mask: bool = False

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The batch on `device`. With non_blocking, a CPU batch is copied from pinned memory (pinned
        here if it is not already), so the copy is queued behind the device's work instead of waiting
        for it."""
        def move(x):
            if not torch.is_tensor(x):
                return x
            if non_blocking and torch.device(device).type == "cuda":
                x = pinned(x)
            return x.to(device, non_blocking=non_blocking)

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def with_counts(self, img_patch_id: int) -> "Batch":
        """This batch (on the CPU) with its host-side counts filled in."""
        from model.attention import DocLayout

        return replace(self, n_docs=DocLayout.count_documents(self.segment_ids_BT),
                       n_images=int(self.n_images_B.clamp(0, self.images_BNCHW.shape[1]).sum()),  # as the forward's slots
                       n_patch_tokens=int((self.tokens_BT == img_patch_id).sum()))

    def fixed_shapes(self, doc_slots: int | None = None, document_mask: bool = False) -> "Batch":
        """This batch (with its counts) laid out in shapes that depend on B, T and the image slots
        alone, except for the documents, rounded up to a power of two (or to `doc_slots`, at least
        that): every image slot goes through the patch encoder (an unused one's output is dropped)
        and the layout has `doc_slots` documents, the last ones empty. The forward's results are
        the same (model/transformer.py, model/attention.py: DocLayout.from_segments). document_mask:
        the dense layers' document-mask path even where every row is one document (the same result)."""
        if self.n_docs is None or self.n_images is None:
            raise ValueError("fixed_shapes needs the host-side counts (with_counts)")
        slots = doc_slots_for(self.n_docs)
        if doc_slots is not None:
            if doc_slots < slots:
                raise ValueError(f"doc_slots={doc_slots}: this batch needs {slots} (its {self.n_docs} documents)")
            slots = doc_slots
        B, N = self.images_BNCHW.shape[:2]
        return replace(self, doc_slots=slots, image_slots=B * N, document_mask=document_mask)

    @classmethod
    def from_dict(cls, d: dict, img_patch_id: int | None = None) -> "Batch":
        """From the pipeline's column dict (numpy arrays or CPU tensors), casting to the contract's
        dtypes; with `img_patch_id`, the host-side counts are filled in (`with_counts`)."""
        def t(name, dtype):
            x = d[name]
            x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
            return x.to(dtype)

        batch = cls(
            tokens_BT=t("tokens", torch.int64),
            targets_BT=t("targets", torch.int64),
            positions_BT=t("positions", torch.int64),
            segment_ids_BT=t("segment_ids", torch.int32),
            images_BNCHW=t("images", torch.uint8),
            n_images_B=t("n_images", torch.int32),
            answer_mask_BT=t("answer_mask", torch.bool),
        )
        return batch if img_patch_id is None else batch.with_counts(img_patch_id)

    @property
    def n_text_targets(self) -> int:
        return int((self.targets_BT != IGNORE_INDEX).sum())


def doc_slots_for(n_docs: int) -> int:
    """The documents' slots of a batch with n_docs documents: the next power of two, so that a run
    sees a handful of layouts (one captured step each) whatever its documents' lengths."""
    return 1 << max(n_docs - 1, 0).bit_length()


def pinned(x: torch.Tensor) -> torch.Tensor:
    """x in pinned host memory (itself if it is there already, or not on the CPU), so that a copy
    to the GPU with non_blocking=True is queued instead of waited for."""
    return x if x.device.type != "cpu" or x.is_pinned() else x.pin_memory()
