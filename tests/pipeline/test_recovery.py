"""Recovery: a worker killed mid-run resumes from the last checkpoint in the same MLflow run, and
`msa-train --resume` continues a stopped run — with no gap and no repeat in the logged steps."""
import pytest

from pipeline.train import main as train_main

pytestmark = pytest.mark.slow


def _steps(client, run_id, key="train/lm_loss"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_worker_killed_then_resume(demo_shards, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--config", "configs/tiny.toml", "--tracking-uri", uri,
              "--set", f"data.shards=['{demo_shards}']", "--set", f"output_dir='{tmp_path / 'out'}'",
              "--set", "tracking.experiment='recovery'", "--set", "model.n_layers=2",
              "--set", "train.log_every=2", "--set", "train.checkpoint_every=4", "--set", "train.warmup_steps=2",
              "--set", "ray.parallel=fsdp"]  # FSDP2 here (sharded state gathered into the checkpoint); DDP elsewhere
    # 1) rank 1 is SIGKILLed right after step 6; Ray Train restarts the workers from the step-4 checkpoint
    rc = train_main(common + ["--set", "train.max_steps=10", "--set", "debug.kill_worker_at_step=6",
                              "--set", "ray.max_failures=1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[debug] killing worker rank 1 at step 6" in out
    assert "resumed at step 4" in out

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("recovery").experiment_id])
    assert run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id) == [2, 4, 6, 8, 10]

    # 2) the finished run is continued to 14 steps from its last checkpoint: same MLflow run
    rc = train_main(common + ["--resume", "--set", "train.max_steps=14"])
    assert rc == 0
    assert "resumed at step 10" in capsys.readouterr().out
    runs = client.search_runs([client.get_experiment_by_name("recovery").experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    assert runs[0].info.status == "FINISHED"
    assert _steps(client, run.info.run_id) == [2, 4, 6, 8, 10, 12, 14]
    assert _steps(client, run.info.run_id, "train/tokens_per_s") == [2, 4, 6, 8, 10, 12, 14]


def test_resume_without_a_run_is_a_clear_error(tmp_path, capsys):
    rc = train_main(["--config", "configs/tiny.toml", "--set", f"output_dir='{tmp_path}'", "--resume"])
    assert rc == 2
    assert "no run to resume" in capsys.readouterr().err
