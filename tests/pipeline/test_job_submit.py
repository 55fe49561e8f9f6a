"""`ray job submit` to a local head that this test starts (and stops: only this one)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_ray_job_submit_runs_msa_train(demo_shards, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    bin_dir = str(Path(sys.executable).parent)
    # the job's entrypoint runs under the cluster's PATH: the same Python environment as this test
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ["PATH"]
    ctx = ray.init(num_cpus=4)  # a local head with its dashboard (the job server); token auth stays on
    try:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        cmd = [
            str(Path(bin_dir) / "ray"), "job", "submit", "--address", f"http://{ctx.dashboard_url}",
            "--working-dir", str(REPO), "--",
            "python", "-m", "pipeline.train", "--config", "configs/tiny.toml", "--address", "auto",
            "--tracking-uri", uri,
            "--set", f"data.shards=['{demo_shards}']", "--set", f"output_dir='{tmp_path / 'out'}'",
            "--set", "model.n_layers=2", "--set", "train.max_steps=4", "--set", "train.log_every=2",
            "--set", "tracking.experiment='job'",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert "succeeded" in proc.stdout + proc.stderr
        assert "[msa-train] done" in proc.stdout
    finally:
        ray.shutdown()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("job").experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/lm_loss")) == [2, 4]
