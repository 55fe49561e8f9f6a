"""Checkpoints: atomic, named by step, verified on load (sizes, hashes, shapes), pruned, loadable with
weights_only=True, with the RNG states restored exactly."""
import json
import random

import numpy as np
import pytest
import torch

from pipeline.checkpoint import (CheckpointError, check_shapes, checkpoint_name, latest_checkpoint,
                                 list_checkpoints, load_checkpoint, prune_checkpoints, read_data_state,
                                 remove_stale_temporaries, resolve_checkpoint, restore_rng, rng_state,
                                 verify_checkpoint, write_checkpoint)
from pipeline.plan import DataState


def _model():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


def _write(run_dir, step, model=None):
    model = model or _model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "tokens_seen": 10 * step,
             "skipped_steps": 0, "rng": rng_state()}
    data = DataState([step, 0], {1: {11, 12}}).to_json()
    return write_checkpoint(run_dir, step, state, data, {"d_model": 8}), model


def test_write_then_load_roundtrip(tmp_path):
    path, model = _write(tmp_path, 120)
    assert path.name == checkpoint_name(120) == "checkpoint_000120"
    state, data, manifest = load_checkpoint(path)
    assert state["step"] == 120 and manifest["step"] == 120
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v)
    assert data["docs_done"] == [120, 0]
    assert read_data_state(path).done_ids == {1: {11, 12}}
    check_shapes(manifest, model.state_dict(), path)  # fits its own model


def test_rng_states_survive_the_roundtrip(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    path, _ = _write(tmp_path, 1)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    state, _, _ = load_checkpoint(path)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_a_half_written_checkpoint_is_never_the_newest(tmp_path):
    _write(tmp_path, 4)
    # a crash during the write of step 8: the temporary directory holds files but was never renamed
    half = tmp_path / ".tmp-checkpoint_000008-999"
    half.mkdir()
    (half / "state.pt").write_bytes(b"partial")
    # and a directory with the final name but no manifest (another writer, an older version)
    (tmp_path / "checkpoint_000012").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint_000004"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    assert remove_stale_temporaries(tmp_path) == [half] and not half.exists()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoint_000012")


def test_corruption_is_detected_and_named(tmp_path):
    path, _ = _write(tmp_path, 4)
    blob = bytearray((path / "state.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (path / "state.pt").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="state.pt: content does not match"):
        verify_checkpoint(path)
    (path / "data_state.json").write_text(json.dumps({"docs_done": [0, 0]}))
    with pytest.raises(CheckpointError, match="data_state.json"):
        read_data_state(path)


def test_shape_mismatch_names_the_tensors(tmp_path):
    path, _ = _write(tmp_path, 4)
    _, _, manifest = load_checkpoint(path)
    other = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2))
    with pytest.raises(CheckpointError, match=r"0.weight: checkpoint \(8, 4\) vs model \(16, 4\)"):
        check_shapes(manifest, other.state_dict(), path)


def test_rewriting_a_step_replaces_it_and_pruning_keeps_the_newest(tmp_path):
    for step in (4, 8, 12, 16):
        _write(tmp_path, step)
    again, model = _write(tmp_path, 16)  # a restart trained step 16 again
    assert torch.equal(load_checkpoint(again)[0]["model"]["0.weight"], model.state_dict()["0.weight"])
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["checkpoint_000004", "checkpoint_000008"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [12, 16]
    assert prune_checkpoints(tmp_path, keep=0) == []  # 0 keeps everything


def test_a_run_directory_stands_for_its_newest_checkpoint(tmp_path):
    _write(tmp_path, 4)
    _write(tmp_path, 8)
    assert resolve_checkpoint(tmp_path).name == "checkpoint_000008"
    assert resolve_checkpoint(tmp_path / "checkpoint_000004").name == "checkpoint_000004"
    with pytest.raises(CheckpointError, match="neither a checkpoint nor a run directory"):
        resolve_checkpoint(tmp_path / "empty")


def test_state_file_needs_no_unpickling(tmp_path):
    path, _ = _write(tmp_path, 4)
    torch.load(path / "state.pt", weights_only=True)  # raises on anything but tensors and plain data
