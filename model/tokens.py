"""What the data pipeline and the model agree on about the token sequence, in plain Python: the
packer's processes (Ray Data's pack actors and read tasks) import this, not torch, which would cost
each of them seconds of start-up for nothing.
"""
from __future__ import annotations

IGNORE_INDEX = -100  # the target of a position with no next text token (no LM loss there)


def image_patches(image_size: int, patch_size: int) -> int:
    """Patch tokens of one image_size x image_size image."""
    return (image_size // patch_size) ** 2


def image_tokens(image_size: int, patch_size: int) -> int:
    """Tokens one image takes in the sequence: begin + patches + end (the packer and the model agree on it)."""
    return image_patches(image_size, patch_size) + 2
