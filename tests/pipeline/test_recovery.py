"""Recovery, end to end on a local Ray, for DDP (the default) and FSDP2: a training worker killed with
`kill -9` by its pid mid-run, then (DDP) `msa-train --resume` of the finished run. Each ends in one FINISHED
MLflow run with every logged step exactly once, and the data position restored exactly: across the
kill and the resume no piece of a document is trained on twice within an epoch and none is skipped.

The shards are damaged on purpose (a truncated tar, a corrupt JSON member, an undecodable image, a
sample without its text, a member whose name escapes its sample): the run skips and counts them.
"""
import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest

from pipeline.trace import Killer, exactly_once_problems, trained_timeline
from pipeline.train import main as train_main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("train_ray")]  # one Ray for these runs (conftest.py)


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory):
    """120 demo documents in 6 shards of 20; shard 1 truncated, shard 2 with four damaged samples."""
    from data_prep.cli import main as prep_main

    out = tmp_path_factory.mktemp("damaged") / "shards"
    assert prep_main(["demo", "--output", str(out), "--documents", "120", "--max-chars", "2000",
                      "--shard-docs", "20", "--vocab-size", "2048", "--quiet"]) == 0
    shard1, shard2 = out / "shard-000001.tar", out / "shard-000002.tar"
    blob = shard1.read_bytes()
    shard1.write_bytes(blob[:int(len(blob) * 0.6)])
    members = []
    with tarfile.open(shard2) as tar:
        for info in tar:
            members.append((info.name, tar.extractfile(info).read()))
    keys = sorted({n.split(".", 1)[0] for n, _ in members})
    bad_json, bad_image, no_json, unsafe_before = keys[3], keys[7], keys[11], keys[15]
    rewritten = []
    for name, data in members:
        key, field = name.split(".", 1)
        if key == bad_json and field == "json":
            data = data[: len(data) // 2]
        if key == bad_image and field.endswith(".png"):
            data = b"\x89PNG" + bytes(len(data))
        if key == no_json and field == "json":
            continue
        if key == unsafe_before and field == "json":
            rewritten.append(("../escape.json", b"{}"))  # a sample of its own, between two others
        rewritten.append((name, data))
    with tarfile.open(shard2, "w") as tar:
        for name, data in rewritten:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def _steps(client, run_id, key="train/lm_loss"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _fresh_ids(shard: str, plan_idx: int, documents: int, cfg: dict) -> set[int]:
    """Every id a fresh, uninterrupted pass over one shard produces (pieces and dropped documents)."""
    from pipeline.data import PackDocuments, read_shard

    m = cfg["model"]
    packer = PackDocuments(str(Path(shard).parent / "tokenizer.json"), cfg["data"]["seq_len"] or m["max_seq_len"],
                           m["image_size"], m["patch_size"], cfg["data"]["pack_docs"])
    ids = set()
    for block in read_shard(shard, plan_idx, documents, cfg["data"]["pack_docs"]):
        out = packer({k: block[k].to_numpy() for k in block.columns})
        ids |= set(int(x) for x in out["piece_ids"].ravel() if x)
    return ids


def _check_exactly_once(run_dir: Path, max_steps: int) -> None:
    from pipeline.checkpoint import latest_checkpoint, read_data_state
    from pipeline.plan import DataPlan

    info = json.loads((run_dir / "run_info.json").read_text())
    plan = DataPlan.from_json(info["plan"])
    assert exactly_once_problems(run_dir, max_steps) == []  # every step, no piece twice
    seen = {pair for pairs in trained_timeline(run_dir).values() for pair in pairs}
    state = read_data_state(latest_checkpoint(run_dir))
    consumed = [i for i, c in enumerate(state.consumed(plan)) if c]
    assert consumed, "the test should consume some plan entries completely"
    for i in consumed:  # none skipped: a consumed entry's trained ids are exactly a fresh pass's
        ref = plan.shards[plan.entries[i].shard]
        trained = {pid for e, pid in seen if e == i}
        assert trained == _fresh_ids(ref.path, i, ref.documents, info["config"]), f"plan entry {i} ({ref.path})"


def _kill_and_resume(damaged_shards, tmp_path, capsys, parallel: str, resume: bool = True):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out_dir = tmp_path / "out"
    common = ["--config", "configs/tiny.toml", "--tracking-uri", uri,
              "--set", f"data.shards=['{damaged_shards}']", "--set", f"output_dir='{out_dir}'",
              "--set", "data.eval_shards=''", "--set", "train.eval_every=0",
              "--set", "tracking.experiment='recovery'", "--set", "model.n_layers=2", "--set", "data.pack_docs=8",
              "--set", "train.log_every=3", "--set", "train.checkpoint_every=4", "--set", "train.warmup_steps=2",
              "--set", "schedule.warmup_tokens=16384", "--set", f"ray.parallel='{parallel}'",
              "--set", "debug.trace_data=true"]
    # 1) after step 10, rank 1 stops and is killed from outside with SIGKILL by its pid; Ray Train
    #    restarts the workers, which resume from the step-8 checkpoint
    killer = Killer(out_dir / "ray", rank=1, step=10)
    killer.start()
    try:
        rc = train_main(common + ["--set", "train.max_steps=12", "--set", "debug.pause_at_step=10",
                                  "--set", "ray.max_failures=1"])
    finally:
        killer.stop = True
    assert rc == 0
    assert killer.killed, "the paused worker was never killed"
    printed = capsys.readouterr().out
    assert "resumed at step 8" in printed

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("recovery").experiment_id])
    assert run.info.status == "FINISHED"
    # windows are logged every 3 steps and at every checkpoint (every 4), each step once
    assert _steps(client, run.info.run_id) == [3, 4, 6, 8, 9, 12]
    run_dir = out_dir / "ray" / run.info.run_name
    _check_exactly_once(run_dir, 12)

    kept_steps = [4, 8, 12]
    if resume:
        # 2) the finished run is continued to 16 steps from its last checkpoint: the same MLflow run
        rc = train_main(common + ["--resume", "--set", "train.max_steps=16"])
        assert rc == 0
        assert "resumed at step 12" in capsys.readouterr().out
        runs = client.search_runs([client.get_experiment_by_name("recovery").experiment_id])
        assert [r.info.run_id for r in runs] == [run.info.run_id]
        run = runs[0]
        assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
        assert "failure_reason" not in run.data.tags
        for key in ("train/lm_loss", "train/tokens_per_s", "train/skipped_samples"):
            assert _steps(client, run.info.run_id, key) == [3, 4, 6, 8, 9, 12, 15, 16], key
        _check_exactly_once(run_dir, 16)
        kept_steps = [8, 12, 16]

    # the damage was skipped and counted by reason, never a crash (epoch 0 reads every shard)
    skipped = {k.removeprefix("train/skipped_samples/"): v for k, v in run.data.metrics.items()
               if k.startswith("train/skipped_samples/")}
    assert skipped.get("truncated_shard", 0) >= 1
    for reason in ("bad_json", "bad_image", "missing_json", "unsafe_member"):
        assert skipped.get(reason, 0) >= 1, (reason, skipped)
    assert run.data.metrics["train/skipped_samples"] == sum(skipped.values())
    # checkpoints: named by step, the newest kept, each loadable
    from pipeline.checkpoint import list_checkpoints, verify_checkpoint

    kept = list_checkpoints(run_dir)
    assert [s for s, _ in kept] == kept_steps  # train.keep_checkpoints = 3
    verify_checkpoint(kept[-1][1])


def test_ddp_worker_killed_by_pid_then_resumed(damaged_shards, tmp_path, capsys):
    _kill_and_resume(damaged_shards, tmp_path, capsys, "ddp")


def test_fsdp_worker_killed_by_pid(damaged_shards, tmp_path, capsys):
    # the kill already restores FSDP2's sharded state from a checkpoint; `--resume` takes the same load
    # path, which the DDP test covers, so this one stops after the kill (one training run fewer in CI)
    _kill_and_resume(damaged_shards, tmp_path, capsys, "fsdp", resume=False)


def test_resume_without_a_run_is_a_clear_error(tmp_path, capsys):
    rc = train_main(["--config", "configs/tiny.toml", "--set", f"output_dir='{tmp_path}'", "--resume"])
    assert rc == 2
    assert "no run to resume" in capsys.readouterr().err


def test_resume_of_a_complete_run_says_so(damaged_shards, tmp_path, capsys):
    """A run at its last step is not started again: the message says how to train on."""
    import torch

    from pipeline.checkpoint import write_checkpoint
    from pipeline.config import load_config
    from pipeline.train import _plan

    run_dir = tmp_path / "ray" / "done"
    run_dir.mkdir(parents=True)
    cfg = load_config("configs/tiny.toml", [f"data.shards=['{damaged_shards}']", f"output_dir='{tmp_path}'",
                                            "train.max_steps=4"])
    (run_dir / "run_info.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "plan": _plan(cfg).to_json(),
                                                       "mlflow_run_id": "abc", "tracking_uri": "sqlite:///x.db"}))
    write_checkpoint(run_dir, 4, {"model": {"w": torch.zeros(1)}}, {"docs_done": []}, {})
    rc = train_main(["--config", "configs/tiny.toml", "--set", f"output_dir='{tmp_path}'", "--resume", "done"])
    assert rc == 0
    assert "is complete at step 4" in capsys.readouterr().out
