"""msa-study end to end: the CPU tiny study (every arm, 2 seeds) on a real local Ray, real MLflow
(SQLite) and real shards, through main(argv); and its config errors.

    pytest -q tests/pipeline/test_study.py            # the end-to-end run is marked slow (minutes)
"""
import json

import pytest

from pipeline.study import main as study_main

# the tiny study made smaller still for CI: 512-token rows, 4 steps of 2 rows (each logged, so that 0.75 of
# them is a logging step), 8 held-out documents
SMALL = ["ray.num_workers=1", "train.batch_size=2", "data.seq_len=512", "train.log_every=1", "train.warmup_steps=2",
         "train.stats_every=2", "train.eval_every=0", "schedule.warmup_tokens=2048"]
RUN_KEYS = {"seed", "tokens", "mlflow_run_id", "eval_lm_loss", "retrieval_acc", "retrieval_acc_by_distance",
            "step_ms", "sparsity"}


def _argv(out, demo_shards, heldout):
    return ["--config", "configs/study-tiny.toml", "--set", f"output_dir='{out}'",
            "--set", f"train_shards=['{demo_shards}']", "--set", f"eval.shards='{heldout}'",
            "--set", "tokens=4096", "--set", "eval.documents=8", "--set", "eval.stats_batches=1",
            "--set", f"overrides={SMALL!r}"]


@pytest.mark.slow
@pytest.mark.usefixtures("without_shared_ray")
def test_tiny_study_end_to_end(demo_shards, heldout_long_shards, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "study"
    argv = _argv(out, demo_shards, heldout_long_shards)
    # the two seeds at once, each in its own process with its own local Ray (on a GPU host, its own GPU)
    assert study_main(argv + ["--parallel", "2"]) == 0
    printed = capsys.readouterr().out
    assert "retrofit starts at step 3" not in printed  # 0.75 of 4 steps is a logging step: no note
    assert "seeds [0, 1] in 2 lanes at once" in printed
    # two local Rays on one host: Ray's own helpers inside each must find their cluster, not trip over the other
    assert "multiple active Ray instances" not in printed
    for seed in (0, 1):  # each lane's output is on the console, prefixed, and in its log
        assert f"[s{seed}] [msa-study] dense-s{seed}: training 4 steps" in printed
        log = (out / "logs" / f"lane-s{seed}.log").read_text()
        assert f"native-s{seed}" in log and f"native-s{1 - seed}" not in log

    res = json.loads((out / "results.json").read_text())
    assert list(res["arms"]) == ["dense", "native", "retrofit", "dense-patched"]
    assert res["commit"] and res["device"].startswith("CPU")
    for arm, body in res["arms"].items():
        runs = body["runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert RUN_KEYS <= set(r), arm
            assert r["tokens"] == 4096  # equal training tokens in every arm
            assert 0 < r["eval_lm_loss"] < 12 and 0 <= r["retrieval_acc"] <= 1
            assert r["retrieval_acc_by_distance"] and set(r["retrieval_acc_by_distance"]) <= {
                "0-16", "16-32", "32-64", "64-128", "128-256", "256-512"}
        assert body["summary"]["eval_lm_loss"]["n"] == 2 and body["summary"]["eval_lm_loss"]["std"] is not None
        assert set(body["summary"]["retrieval_acc"]) == {"mean", "std", "n"}
    # every run evaluated on the same held-out documents, and the set is recorded
    sets = {json.dumps(r["eval_set"], sort_keys=True) for b in res["arms"].values() for r in b["runs"]}
    assert len(sets) == 1 and not res["eval_sets_differ"]
    assert res["eval"]["shards"] == str(heldout_long_shards) and len(res["eval"]["sha256"]) == 64
    assert res["eval"]["documents"] == 8
    # same seed, same data order: dense and native consumed the same tokens; the retrofit continues
    # the dense run's data plan, re-reading at most the shard in flight at its checkpoint
    dense = {r["seed"]: r for r in res["arms"]["dense"]["runs"]}
    for r in res["arms"]["native"]["runs"]:
        assert r["tokens_seen"] == dense[r["seed"]]["tokens_seen"]
        # the same documents in the same order: the same data position at the retrofit's start step
        dense_pos, native_pos = (json.loads((out / "runs" / "ray" / f"{arm}-s{r['seed']}" / "checkpoint_000003" /
                                             "data_state.json").read_text()) for arm in ("dense", "native"))
        assert dense_pos == native_pos and dense_pos["done_ids"]
    for r in res["arms"]["retrofit"]["runs"]:
        assert r["tokens_seen"] == pytest.approx(dense[r["seed"]]["tokens_seen"], rel=0.25)
        assert r["source"]["step"] == 3 and r["source"]["dense_run"] == dense[r["seed"]]["mlflow_run_id"]
    # MSA arms are sparse and measured; the dense arm is not
    for arm in ("native", "retrofit", "dense-patched"):
        for r in res["arms"][arm]["runs"]:
            assert 0.2 < r["sparsity"] < 1 and 0 < r["score_recall"] <= 1 + 1e-6, arm
            assert set(r["per_layer"]) == {"1", "2", "3"}
    assert all(r["sparsity"] == 0 for r in res["arms"]["dense"]["runs"])
    # the oracle patch evaluates the dense checkpoints themselves
    for r in res["arms"]["dense-patched"]["runs"]:
        assert r["checkpoint"] == dense[r["seed"]]["checkpoint"]
    # comparisons paired by seed, with a t-interval around the mean difference (2 seeds)
    comp = {(c["arm"], c["metric"]): c for c in res["comparisons"]}
    for arm in ("native", "retrofit", "dense-patched"):
        c = comp[(arm, "eval_lm_loss")]
        assert c["baseline"] == "dense" and c["n"] == 2 and c["seeds"] == [0, 1]
        lo, hi = c["ci95"]
        assert lo <= c["diff_mean"] <= hi
        want = sum(r["eval_lm_loss"] for r in res["arms"][arm]["runs"]) / 2 - \
            sum(r["eval_lm_loss"] for r in dense.values()) / 2
        assert c["diff_mean"] == pytest.approx(want)

    report = (out / "report.md").read_text()
    assert "## Conclusion" in report and "| retrofit | 2 |" in report and "95% CI" in report
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == ["loss_by_position.png", "loss_curves.png", "msa_layers.png", "retrieval_by_distance.png"]

    # MLflow: one parent run tagged `study`, a child per (arm, seed), the report as its artifacts
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("msa-study")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "study" in r.data.tags]
    assert parent.data.tags["study"] == "tiny-cpu" and parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(
        f"{a}-s{s}" for a in ("dense", "native", "retrofit", "dense-patched") for s in (0, 1))
    assert len(runs) == 9 and all(r.info.status == "FINISHED" for r in children)
    ids = {r["mlflow_run_id"] for b in res["arms"].values() for r in b["runs"]}
    assert ids == {r.info.run_id for r in children}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "results.json", "figures"} <= artifacts
    retro = next(r for r in children if r.info.run_name == "retrofit-s0")
    steps = sorted(m.step for m in client.get_metric_history(retro.info.run_id, "train/lm_loss"))
    assert steps == [4]  # it continued the dense run at step 3: its first (and only) window ends at 4
    assert retro.data.tags["mode"] == "retrofit" and retro.data.tags["study_arm"] == "retrofit"

    # resumable: the same command again trains and evaluates nothing, and keeps the results
    records = {p.name: p.stat().st_mtime for p in (out / "records").glob("*.json")}
    assert len(records) == 8
    assert study_main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("recorded already, skipped") == 8 and "training" not in printed
    assert {p.name: p.stat().st_mtime for p in (out / "records").glob("*.json")} == records
    assert len(client.search_runs([exp.experiment_id])) == 9
    assert json.loads((out / "results.json").read_text())["arms"]["native"]["runs"] == res["arms"]["native"]["runs"]
    assert res["missing"] == [] and "Incomplete" not in report

    # a study still accumulating says what is missing (here: a record removed, the report rebuilt);
    # a record made in another session, whose held-out shards lay elsewhere, is the same evaluation set
    (out / "records" / "retrofit-s1.json").unlink()
    moved_path = out / "records" / "native-s1.json"
    moved = json.loads(moved_path.read_text())
    moved["eval_set"]["shards"] = "elsewhere/heldout"
    moved_path.write_text(json.dumps(moved))
    assert study_main(argv + ["--report-only"]) == 0
    part = json.loads((out / "results.json").read_text())
    assert part["missing"] == ["retrofit-s1"] and [r["seed"] for r in part["arms"]["retrofit"]["runs"]] == [0]
    assert not part["eval_sets_differ"] and part["eval"]["sha256"] == res["eval"]["sha256"]
    assert sorted(part["eval"]["shards_seen"]) == sorted(["elsewhere/heldout", str(heldout_long_shards)])
    report = (out / "report.md").read_text()
    assert "**Incomplete**: not recorded yet: retrofit-s1." in report and "identical for every run" in report
    # other documents are another evaluation set, and the report says so
    moved["eval_set"]["sha256"] = "0" * 64
    moved_path.write_text(json.dumps(moved))
    assert study_main(argv + ["--report-only"]) == 0
    assert json.loads((out / "results.json").read_text())["eval_sets_differ"]
    assert "not all evaluated on the same documents" in (out / "report.md").read_text()


def test_study_config_errors_name_the_field(demo_shards, heldout_long_shards, tmp_path, capsys):
    base = ["--config", "configs/study-tiny.toml", "--set", f"output_dir='{tmp_path}'",
            "--set", f"train_shards=['{demo_shards}']", "--set", f"eval.shards='{heldout_long_shards}'"]
    cases = [
        (["--set", "tokens=1000"], "tokens: 1000 is not a multiple"),
        (["--set", "retrofit_fraction=1.5"], "retrofit_fraction: must be in (0, 1)"),
        (["--set", "arms=['dense', 'sparse']"], "arms[1]: unknown built-in arm 'sparse'"),
        (["--set", "arms=['native', 'retrofit']"], "arms: retrofit start from the dense arm"),
        (["--set", "seeds=[0, 0]"], "seeds: must be distinct"),
        (["--set", "eval.documents=0"], "eval.documents: must be at least 1"),
        (["--set", "bogus=1"], "bogus: unknown key"),
        (["--set", f"train_shards=['{tmp_path}']"], "train_shards[0]:"),
        (["--set", f"eval.shards='{tmp_path}'"], "eval.shards:"),
        (["--set", "overrides=['train.lr=-1']"], "train.lr: must be positive"),
        (["--parallel", "0"], "parallel: must be at least 1"),
        (["--parallel", "2", "--set", "overrides=['train.log_every=2', 'ray.address=\"auto\"']"],
         "parallel: 2 lanes start local Rays"),
    ]
    for extra, message in cases:
        assert study_main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
    assert not list(tmp_path.iterdir())  # nothing was started


def test_the_gpu_study_config_meets_the_issue(demo_shards, heldout_long_shards):
    """configs/study-gpu.toml: >= 100M parameters, >= 16K context, >= 2 seeds, >= 20M tokens per arm
    and seed, and a checkpoint kept where the retrofit starts (its corpora stand in for the real ones)."""
    from model.flops import count_parameters
    from pipeline.study import plan_study
    from pipeline.study_config import load_study_config

    cfg = load_study_config("configs/study-gpu.toml", [f"train_shards=['{demo_shards}']",
                                                       f"eval.shards='{heldout_long_shards}'"])
    plan = plan_study(cfg)
    assert count_parameters(plan.base.model)["params_total"] >= 100e6
    assert plan.base.seq_len >= 16384 and len(cfg.seeds) >= 2 and plan.tokens >= 20e6
    assert plan.base.ray.use_gpu and plan.base.ray.num_workers == 1
    assert plan.retrofit_step == 0.75 * plan.steps
    assert plan.retrofit_step % plan.checkpoint_every == 0
    # checkpoints from the retrofit's start to the end all kept: Ray deletes the older ones
    assert plan.keep_checkpoints >= (plan.steps - plan.retrofit_step) // plan.checkpoint_every + 1
