"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint directory holds `state.pt` (model, optimizer, step, tokens seen, RNG states, MLflow run id)
and is handed to Ray Train through `ray.train.report`, which keeps it in the run's storage.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"


def save_state(directory: Path, model_state: dict, optimizer_state: dict, step: int, extra: dict[str, Any]) -> Path:
    """Write the (full, unsharded) model and optimizer states with the loop's own state."""
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "step": step,
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        **extra,
    }
    path = Path(directory) / STATE_FILE
    torch.save(state, path)
    return path


def load_state(directory: Path) -> dict[str, Any]:
    # our own checkpoints, written by save_state: they hold numpy/python RNG state, hence not weights_only
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)


def restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
