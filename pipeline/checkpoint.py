"""Checkpoints you can trust: written atomically, named by step, verified on load.

A run directory (`<output_dir>/ray/<run name>/`, on storage every node sees) holds one directory per
checkpoint, `checkpoint_000120/`, with

    state.pt          model, optimizer, step, counters, RNG states (plain tensors and numbers only:
                      it loads with `torch.load(weights_only=True)`, nothing is unpickled)
    data_state.json   the data position (pipeline/plan.py, DataState)
    checkpoint.json   the manifest, written last: format, step, each file's size and SHA-256, the
                      model config, every parameter's shape

Writing: rank 0 writes into a hidden `.tmp-checkpoint_000120-<pid>/` next to the final name, flushes
each file to disk, writes the manifest last and then renames the directory into place (a rename is
atomic on a POSIX file system and on the NFS/Lustre mounts a cluster shares). A reader never sees a
half-written checkpoint, and a crash during a write leaves the previous checkpoint as the newest.
Reading: only directories named `checkpoint_<step>` with a manifest count; loading checks every
file's size and hash and the parameter shapes, and refuses a mismatch with a message that names it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 2
STATE_FILE = "state.pt"
DATA_STATE_FILE = "data_state.json"
MANIFEST = "checkpoint.json"
_NAME_RE = re.compile(r"^checkpoint_(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, corrupt or of another model)."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


class _HashingWriter(io.RawIOBase):
    """A file that hashes what is written through it (no second pass over a multi-GB state)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


def _write_file(path: Path, write) -> dict[str, Any]:
    with open(path, "wb") as f:
        w = _HashingWriter(f)
        write(w)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": w.size, "sha256": w.sha.hexdigest()}


def _file_digest(path: Path) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every RNG the loop uses, as tensors, ints and tuples (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(rng: dict[str, Any]) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def write_checkpoint(run_dir: Path, step: int, state: dict[str, Any], data_state: dict[str, Any],
                     model_config: dict[str, Any]) -> Path:
    """Write checkpoint `step` of a run atomically; returns its final directory.

    `state` holds the full (unsharded) `model` and `optimizer` state dicts and the loop's counters.
    An existing checkpoint of the same step (a restart that trained the same steps again) is replaced.
    """
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f"{_TMP_PREFIX}{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files = {
        STATE_FILE: _write_file(tmp / STATE_FILE, lambda f: torch.save({**state, "step": step}, f)),
        DATA_STATE_FILE: _write_file(tmp / DATA_STATE_FILE,
                                     lambda f: f.write(json.dumps({"step": step, **data_state}).encode())),
    }
    manifest = {
        "format": FORMAT,
        "step": step,
        "files": files,
        "model_config": model_config,
        "shapes": {k: list(v.shape) for k, v in state["model"].items()},
    }
    _write_file(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    if final.exists():  # the same step written again after a restart: the new one replaces it
        old = run_dir / f"{_TMP_PREFIX}{step:06d}-old-{os.getpid()}"
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(final)
    _fsync_dir(run_dir)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory (no hashing), or CheckpointError naming what is wrong."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not path.exists():
        raise CheckpointError(f"{directory}: not a complete checkpoint (no {MANIFEST}; it was never "
                              f"finished, or was written by an older version)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: checkpoint format {manifest.get('format')!r}, this version reads "
                              f"format {FORMAT}")
    return manifest


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest (size and SHA-256); returns the manifest."""
    manifest = read_manifest(directory)
    for name, expect in manifest["files"].items():
        path = Path(directory) / name
        if not path.exists():
            raise CheckpointError(f"{directory}: {name} is missing")
        size, digest = _file_digest(path)
        if size != expect["bytes"] or digest != expect["sha256"]:
            raise CheckpointError(f"{path}: content does not match the manifest ({size} bytes, sha256 "
                                  f"{digest[:12]}.. expected {expect['bytes']} bytes, {expect['sha256'][:12]}..): "
                                  f"the file is corrupt; move this checkpoint aside to use the one before it")
    return manifest


def check_shapes(manifest: dict[str, Any], model_state: dict[str, torch.Tensor], where: Path) -> None:
    """The checkpoint's parameters must be exactly the model's, shape for shape."""
    saved = {k: tuple(v) for k, v in manifest["shapes"].items()}
    own = {k: tuple(v.shape) for k, v in model_state.items()}
    problems = [f"missing from the checkpoint: {', '.join(sorted(set(own) - set(saved))[:6])}"] \
        if set(own) - set(saved) else []
    if set(saved) - set(own):
        problems.append(f"not in the model: {', '.join(sorted(set(saved) - set(own))[:6])}")
    problems += [f"{k}: checkpoint {saved[k]} vs model {own[k]}" for k in sorted(set(saved) & set(own))
                 if saved[k] != own[k]]
    if problems:
        raise CheckpointError(f"{where} does not fit this model (was it written with another model config?):\n  "
                              + "\n  ".join(problems[:10]))


def load_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(state, data_state, manifest) of a verified checkpoint; state loaded with weights_only=True."""
    directory = Path(directory)
    manifest = verify_checkpoint(directory)
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    data_state = json.loads((directory / DATA_STATE_FILE).read_text())
    return state, data_state, manifest


def read_data_state(directory: Path):
    """The data position of a checkpoint (its small file alone, checked against the manifest)."""
    from pipeline.plan import DataState

    manifest = read_manifest(directory)
    path = Path(directory) / DATA_STATE_FILE
    expect = manifest["files"][DATA_STATE_FILE]
    body = path.read_bytes()
    if len(body) != expect["bytes"] or hashlib.sha256(body).hexdigest() != expect["sha256"]:
        raise CheckpointError(f"{path}: content does not match the manifest (corrupt)")
    return DataState.from_json(json.loads(body))


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint of a run directory (a manifest present), oldest first."""
    out = []
    root = Path(run_dir)
    if not root.is_dir():
        return out
    for d in root.iterdir():
        m = _NAME_RE.match(d.name)
        if m and (d / MANIFEST).exists():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory standing for its newest checkpoint."""
    path = Path(path)
    if (path / MANIFEST).exists() or _NAME_RE.match(path.name):
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise CheckpointError(f"{path}: neither a checkpoint nor a run directory with a complete checkpoint")
    return newest


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the half-written checkpoints a crash left behind (never a complete one)."""
    removed = []
    root = Path(run_dir)
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(_TMP_PREFIX):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints (0 keeps all); returns the removed directories."""
    found = list_checkpoints(run_dir)
    if keep <= 0 or len(found) <= keep:
        return []
    removed = []
    for _, d in found[:-keep]:
        # hide it first (a rename is atomic), then delete: a reader never sees a half-deleted one
        hidden = d.with_name(f"{_TMP_PREFIX}{d.name}-deleting")
        d.rename(hidden)
        shutil.rmtree(hidden, ignore_errors=True)
        removed.append(d)
    return removed
