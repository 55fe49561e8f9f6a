"""Every mode through msa-train: the dense baseline, then a retrofit of its checkpoint under the
adaptive top_p selection budget (native MSA with static top-k is the smoke test's run)."""
import json
from pathlib import Path

import pytest

from pipeline.train import main as train_main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("train_ray")]  # one Ray for these runs (conftest.py)


def test_dense_run_then_retrofit_of_its_checkpoint(demo_shards, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--config", "configs/tiny.toml", "--tracking-uri", uri,
              "--set", f"data.shards=['{demo_shards}']", "--set", f"output_dir='{tmp_path / 'out'}'",
              "--set", "tracking.experiment='modes'", "--set", "model.n_layers=2", "--set", "train.log_every=2",
              "--set", "train.eval_every=0", "--set", "train.warmup_steps=2"]
    # the dense run also takes DDP's other gradient path: small buckets, all-reduced in bf16 (gloo)
    assert train_main(common + ["--set", "schedule.mode=dense", "--set", "train.max_steps=6",
                                "--set", "ray.ddp_bucket_mb=1", "--set", "ray.ddp_grad_dtype='bf16'",
                                "--set", "debug.profile_steps=[2, 4]",  # and is profiled on both workers
                                "--set", "tracking.run_name='dense'"]) == 0
    out = capsys.readouterr().out
    assert "building the model without the index branch" in out
    assert "DDP: gradients all-reduced in bf16 (bf16 compress hook), buckets of 1 MiB" in out
    assert "[train] profile of steps 2-3, rank 0: " in out
    dense_ckpt = out.split("last checkpoint: ")[1].split()[0]
    for rank in (0, 1):
        prof = json.loads((Path(dense_ckpt).parent / "profile" / f"rank{rank}.json").read_text())
        assert prof["rank"] == rank and prof["steps"] == 2 and prof["wall_ms_per_step"] > 0

    assert train_main(common + ["--set", "schedule.mode=retrofit", "--set", f"schedule.retrofit_from='{dense_ckpt}'",
                                "--set", "schedule.retrofit_warmup_tokens=24576",  # 3 steps of 8192 tokens
                                "--set", "model.msa.budget='top_p'", "--set", "model.msa.budget_p=0.7",
                                "--set", "model.msa.topk=6", "--set", "model.msa.budget_match_topk=3",
                                "--set", "train.max_steps=8", "--set", "tracking.run_name='retrofit'"]) == 0
    out = capsys.readouterr().out
    retro_ckpt = out.split("last checkpoint: ")[1].split()[0]
    assert "retrofit: loaded the dense checkpoint" in out
    assert "step 3: attention mode -> sparse" in out

    client = MlflowClient(tracking_uri=uri)
    runs = {r.data.tags["mlflow.runName"]: r for r in
            client.search_runs([client.get_experiment_by_name("modes").experiment_id])}
    assert runs["dense"].data.tags["mode"] == "dense"
    assert runs["retrofit"].data.tags["mode"] == "retrofit"
    assert runs["dense"].data.params["model.msa.enabled"] == "False"
    assert "train/kl_index_loss" not in runs["dense"].data.metrics
    assert runs["dense"].data.metrics["train/sparsity"] == 0.0
    assert {a.path for a in client.list_artifacts(runs["dense"].info.run_id, "profile")} == {
        "profile/rank0.json", "profile/rank1.json"}
    r = runs["retrofit"]
    sparsity = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "train/sparsity")}
    assert sparsity[2] == 0.0 and sparsity[8] > 0.2
    # the retrofit starts from the dense run's weights: its first loss is far below a fresh model's
    first_dense = min(client.get_metric_history(runs["dense"].info.run_id, "train/lm_loss"), key=lambda m: m.step)
    first_retro = min(client.get_metric_history(r.info.run_id, "train/lm_loss"), key=lambda m: m.step)
    assert first_retro.value < first_dense.value - 1.0

    # the budget: what a user judges it by, overall, per layer, and where it goes by position
    assert r.data.params["model.msa.budget"] == "top_p" and r.data.params["model.msa.budget_p"] == "0.7"
    assert "model.msa.budget_ratio" not in r.data.params
    bpt = r.data.metrics["train/blocks_per_token"]
    assert 1.0 <= bpt < 6.0, bpt
    assert 1.0 <= r.data.metrics["layer/1/blocks_per_token"] <= 6.0
    arts = {a.path for d in ("plots", "selection") for a in client.list_artifacts(r.info.run_id, d)}
    assert {"plots/budget.png", "plots/selection.png", "selection/blocks_per_token.json"} <= arts, arts
    local = client.download_artifacts(r.info.run_id, "selection/blocks_per_token.json", str(tmp_path))
    prof = json.loads(open(local).read())
    assert prof["budget"] == "top_p" and prof["k_max"] == 6 and list(prof["by_layer"]) == ["1"]
    hist = {int(k): v for k, v in prof["hist"].items()}
    assert min(hist) >= 1 and max(hist) <= 6 and len(hist) > 1, hist
    # equal compute with static top-3 (budget_match_topk): p starts at the config's value and moves
    # after each window toward what static top-3 spends on the same tokens; every rank uses it, the
    # checkpoint keeps where it got to and msa-eval evaluates with that
    budget_p = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "train/budget_p")}
    static = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "train/blocks_per_token_static")}
    assert sorted(budget_p) == [2, 4, 6, 8] and budget_p[2] == pytest.approx(0.7), budget_p
    assert len(set(budget_p.values())) > 1, budget_p  # adjusted once windows with counts came in
    assert set(static) == set(budget_p) and all(1.0 <= v <= 3.0 for v in static.values()), static
    assert prof["budget_p"] == pytest.approx(budget_p[8])  # the p the pictured selection used
    from pipeline.evaluate import load_checkpoint_model
    model, _, state, _ = load_checkpoint_model(Path(retro_ckpt))
    assert state["budget_match"]["kind"] == "top_p" and 0 < state["budget_match"]["param"] < 1
    assert model.budget_param == state["budget_match"]["param"]
    # msa-flops reads the measured counts
    from model.flops import main as flops_main
    assert flops_main(["--preset", "tiny", "--context", "1024", "--budget", "top_p", "--topk", "6",
                       "--counts", str(local)]) == 0
    assert "n(t) from measured" in capsys.readouterr().out
