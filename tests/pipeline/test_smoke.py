"""End to end: shards -> Ray Data -> Ray Train (2 CPU workers) -> an MLflow run, through main(argv)."""
import pytest

from pipeline.train import main as train_main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("train_ray")]  # one Ray for these runs (conftest.py)


def test_tiny_run_end_to_end_logs_to_mlflow(demo_shards, heldout_shards, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = train_main([
        "--config", "configs/tiny.toml",
        "--set", f"data.shards=['{demo_shards}']",
        "--set", f"output_dir='{tmp_path / 'out'}'",
        # 2 rows a worker (the demo's 4 would double the compute of every step, and nothing checked needs it)
        "--set", "train.batch_size=2",
        "--set", "train.max_steps=20", "--set", "train.log_every=5", "--set", "train.checkpoint_every=10",
        "--set", "train.warmup_steps=5", "--set", "schedule.warmup_tokens=40960",  # 10 dense warm-up steps
        "--set", "tracking.experiment='smoke'",
        "--set", f"data.eval_shards='{heldout_shards}'", "--set", "train.eval_every=10",
        "--set", "train.eval_documents=40",
        "--set", "train.peak_tflops=0.05",  # a nominal CPU peak, so that the MFU path runs and logs
        # MLflow's system metrics, which the default turns on for GPU runs only, sampled here on the CPU
        "--set", "tracking.system_metrics='always'", "--set", "tracking.system_metrics_interval_s=5.0",
        "--tracking-uri", uri,
    ])
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "ui --backend-store-uri" in printed
    # Ray's forwarded "constructor arguments in the object store" error lines (harmless) are dropped
    assert "max_restarts > 0" not in captured.err

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("smoke")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mode"] == "msa"
    assert run.data.params["model.d_model"] == "128"
    assert run.data.params["train.max_steps"] == "20"
    for key in ("train/lm_loss", "train/tokens_per_s", "train/lr", "train/grad_norm", "train/data_wait_frac",
                "train/data_wait_frac_max",
                "train/kl_index_loss", "train/sparsity", "train/score_recall", "train/block_recall",
                "train/moe_aux_loss", "train/expert_load_max_over_mean", "train/skipped_steps", "train/mfu",
                "train/index_grad_norm",
                "layer/1/sparsity", "layer/1/kl_index_loss", "layer/1/score_recall"):
        assert key in run.data.metrics, key
    assert "layer/0/sparsity" not in run.data.metrics  # the first layer is dense
    assert "[train] system metrics every 5 s: cpu" in printed
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert "attention mode -> sparse" in printed and "step 10: attention mode -> sparse" in printed
    sparsity = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/sparsity")}
    assert sparsity[5] == 0.0 and sparsity[10] == 0.0  # dense warm-up
    assert all(0.3 < sparsity[s] < 1.0 for s in (15, 20)), sparsity  # MSA really is sparse
    kl = [m.value for m in client.get_metric_history(run.info.run_id, "train/kl_index_loss")]
    assert all(v >= 0 for v in kl)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/training_curves.png" in artifacts
    assert "plots/selection.png" in artifacts
    # what a reader of the run sees first: the model-training view, a description, who and what ran it
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "msa-train" and tags["mlflow.user"]
    assert "Native MSA" in tags["mlflow.note.content"] and "| `train/lm_loss` |" in tags["mlflow.note.content"]
    params = run.data.params
    assert params["train.index_lr"] == params["train.lr"]  # resolved, not 0.0 for "use train.lr"
    assert params["data.seq_len"] == "1024" and int(params["params.index_branch"]) > 0
    assert int(params["params.active"]) < int(params["params.total"])
    assert int(params["train.tokens_per_step"]) == 2 * 2 * 1024  # workers x rows x tokens
    assert not any(k.startswith(("debug.", "schedule.retrofit_")) for k in params)  # only what applies
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.json", "data", "plots"}
    # the console: clean progress lines (no Ray worker prefix) and a summary at the end
    progress = [line for line in printed.splitlines() if line.startswith("[train] step ") and "/20 " in line]
    assert len(progress) == 4 and all("elapsed" in line and " ms" in line for line in progress), progress
    assert "[msa-train] final:" in printed and "lm_loss" in printed.split("[msa-train] final:")[1]
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/lm_loss"),
                                    key=lambda m: m.step)]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/lm_loss"))
    assert steps == [5, 10, 15, 20]
    assert loss[-1] < loss[0] - 1.0, loss
    evals = sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/lm_loss"))
    assert evals == [10, 20]
    assert 0.0 <= run.data.metrics["eval/retrieval_acc"] <= 1.0

    # msa-eval on the last checkpoint logs into the same run
    from pipeline.evaluate import main as eval_main

    ckpt = printed.split("last checkpoint: ")[1].split()[0]
    assert eval_main(["--checkpoint", ckpt, "--shards", str(heldout_shards), "--max-documents", "40", "--log",
                      "--tracking-uri", uri]) == 0
    text = capsys.readouterr().out
    assert "eval/retrieval_acc" in text and "distance" in text
    history = client.get_metric_history(run.info.run_id, "eval/lm_loss")
    assert [m.step for m in history] == [10, 20]  # step 20 was logged by the loop already: not twice
