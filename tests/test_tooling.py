"""The tooling outside the installed packages: benchmarks/ and scripts/ are not shipped, the
benchmarks import and their CPU forms run from the repo root, the shell scripts parse.

    pytest -q tests/test_tooling.py
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("benchmarks.msa_kernels", "benchmarks.train_steps", "benchmarks.prep_throughput", "benchmarks.scaling",
              "benchmarks.select_precision")


def test_only_the_library_packages_are_installed():
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=find.get("include", ("*",)), exclude=find.get("exclude", ()))
    assert {p.split(".")[0] for p in packages} == {"data_prep", "kernels", "model", "pipeline"}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmarks_import(name):
    mod = importlib.import_module(name)
    assert callable(mod.main)


def test_compile_check_sweeps_the_benchmark_variants():
    # scripts/compile_check.py refuses to import under TRITON_INTERPRET; what it takes from the
    # benchmark must exist there.
    from benchmarks.msa_kernels import SWEEP
    from kernels.attention import op as attn_op
    from kernels.kl import op as kl_op
    from kernels.select import op as sel_op

    tables = {"attention": attn_op.GPU_CONFIG, "kl": kl_op.GPU_CONFIG, "select": sel_op.GPU_CONFIG}
    for op, key, variants, _ in SWEEP:
        assert key is None or key in tables[op], (op, key)
        assert variants


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.sh")))
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)]).returncode == 0


def _run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_train_steps_runs_on_cpu(tmp_path):
    out = tmp_path / "steps.json"
    proc = _run_module("benchmarks.train_steps", "--device", "cpu", "--preset", "tiny", "--contexts", "128",
                       "--modes", "dense", "sparse", "--iters", "1", "--warmup", "0", "--activation-checkpointing",
                       "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists() and "sparse" in proc.stdout and "activations recomputed" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "sparse"]
    assert all(r["activation_checkpointing"] and r["step_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_msa_layer_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "layer.json"
    proc = _run_module("benchmarks.msa_layer", "--device", "cpu", "--preset", "tiny", "--contexts", "256",
                       "--iters", "1", "--warmup", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["context"] == 256 and row["dense_layer_ms"] > 0 and row["msa_layer_ms"] > 0


@pytest.mark.slow
def test_select_precision_runs_on_cpu(tmp_path, demo_shards):
    out = tmp_path / "sel.json"
    proc = _run_module("benchmarks.select_precision", "--preset", "tiny", "--device", "cpu", "--rows", "2",
                       "--shards", str(demo_shards), "--tokenizer", str(Path(demo_shards) / "tokenizer.json"),
                       "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    from model.presets import get_preset

    assert sorted(int(x) for x in res["layers"]) == get_preset("tiny").msa_layers
    assert res["batches"] == 2 and res["tokens"] == 2 * res["seq_len"]
    from pipeline.tracking import git_commit

    assert res["commit"] == git_commit()  # the code that measured, recorded with its figures
    for row in [*res["layers"].values(), res["mean"]]:
        assert all(0 <= v <= 1 for v in row.values())
        # on the CPU the default path is the reference on fp32 inputs: the exact selection itself
        assert row["model_same_set"] == 1.0 and row["model_score_recall"] == row["exact_score_recall"]
        assert row["fp8_blocks_kept"] > 0.5  # rounding to e4m3 moves a few blocks, not most
    assert "| mean |" in proc.stdout


@pytest.mark.slow
def test_prep_throughput_runs(tmp_path):
    proc = _run_module("benchmarks.prep_throughput", "--photos", "2", "--demo-docs", "20", "--repeat", "1",
                       "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| demo corpus" in proc.stdout


def test_scaling_variants():
    """--variant: the layouts on more GPUs once per variant, their settings after --set's (the later
    --set wins in msa-train), against the one one-GPU base; bad specs refused with the reason."""
    from argparse import Namespace

    from benchmarks.scaling import Layout, layouts, parse_variant, table, train_argv

    variants = [parse_variant("defaults"), parse_variant("bf16 ray.fsdp_param_dtype='bf16' ray.fsdp_unit_blocks=3")]
    assert variants == [("defaults", ()), ("bf16", ("ray.fsdp_param_dtype='bf16'", "ray.fsdp_unit_blocks=3"))]
    lays = layouts([1, 2], ["fsdp"], variants=variants)
    assert [lay.name for lay in lays] == ["1gpu", "fsdp2-defaults", "fsdp2-bf16"]
    # a variant of FSDP2's settings alone leaves DDP's runs as they are (once, without its name); one
    # of DDP's alone the FSDP2 runs; settings of both kinds, or none, concern every run
    assert [lay.name for lay in layouts([1, 2], ["ddp"], graphs=True, graphs_only=True, variants=variants[1:])] == [
        "1gpu-graphs", "ddp2-graphs"]
    assert [lay.name for lay in layouts([1, 2], ["ddp", "fsdp"], variants=variants)] == [
        "1gpu", "ddp2-defaults", "fsdp2-defaults", "fsdp2-bf16"]
    both = [parse_variant("b16 ray.ddp_grad_dtype='bf16'"), parse_variant("mix ray.ddp_bucket_mb=50 train.lr=1e-3")]
    assert [(lay.name, lay.overrides) for lay in layouts([1, 4], ["ddp", "fsdp"], graphs=True, variants=both)] == [
        ("1gpu", ()), ("1gpu-graphs", ()), ("ddp4-b16", ("ray.ddp_grad_dtype='bf16'",)),
        ("ddp4-mix", ("ray.ddp_bucket_mb=50", "train.lr=1e-3")), ("fsdp4-mix", ("ray.ddp_bucket_mb=50", "train.lr=1e-3")),
        ("ddp4-graphs-b16", ("ray.ddp_grad_dtype='bf16'",)), ("ddp4-graphs-mix", ("ray.ddp_bucket_mb=50", "train.lr=1e-3"))]
    args = Namespace(out=Path("/tmp/s"), cpu=True, log_every=5, warmup_steps=2, config=Path("c.toml"),
                     tracking_uri="sqlite:///x.db", overrides=["ray.fsdp_unit_blocks=1", "data.shards=['d']"])
    argv = train_argv(args, lays[2], 8192, lays[2].name, 20, ["debug.trace_data=true"])
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets[-4:] == ["data.shards=['d']", "ray.fsdp_param_dtype='bf16'", "ray.fsdp_unit_blocks=3",
                         "debug.trace_data=true"]
    assert sets.index("ray.fsdp_unit_blocks=1") < sets.index("ray.fsdp_unit_blocks=3")
    assert "ray.fsdp_param_dtype='bf16'" not in train_argv(args, lays[0], 8192, "1gpu", 20, [])
    row = {"run": "fsdp2-bf16-8k", "gpus": 2, "parallel": "fsdp", "context": 8192, "exit_code": 0,
           "variant": "bf16", "tokens_per_s": 10.0}
    assert "| 8,192 | 2 | fsdp [bf16] | 10 |" in table([row])
    for bad in ("", "a/b x=1", "bf16 ray.fsdp_param_dtype"):
        with pytest.raises(ValueError, match="expected a name"):
            parse_variant(bad)
    assert Layout(2, "fsdp").name == "fsdp2"
    # a variant that no run would take is an error before any run, not a silent drop
    from benchmarks.scaling import main
    with pytest.raises(SystemExit, match=r"--variant bf16: its settings concern none of the runs \(--parallel ddp\)"):
        main(["--cpu", "--gpus", "1", "2", "--parallel", "ddp", "--variant", "bf16 ray.fsdp_param_dtype='bf16'"])


@pytest.mark.slow
def test_scaling_runs_on_cpu_workers(tmp_path, demo_shards):
    """benchmarks.scaling end to end on two gloo workers: real `msa-train` runs on a local Ray, read
    back from their MLflow store (tokens/s, step times, efficiencies), a variant's setting reaching
    its run; what a GPU host runs, on the CPU."""
    out = tmp_path / "scaling"
    proc = _run_module("benchmarks.scaling", "--cpu", "--config", "configs/tiny.toml", "--gpus", "1", "2",
                       "--parallel", "ddp", "--no-kill", "--contexts", "1024", "--steps", "6", "--measure-from", "2",
                       "--log-every", "2", "--variant", "defaults", "--variant", "b50 ray.ddp_bucket_mb=50",
                       "--out", str(out), "--set", f"data.shards=['{demo_shards}']", "--set", "data.eval_shards=''")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    res = json.loads((out / "scaling.json").read_text())
    runs = {r["run"]: r for r in res["runs"]}
    assert list(runs) == ["1gpu-1k", "ddp2-defaults-1k", "ddp2-b50-1k"]
    for r in runs.values():
        assert r["status"] == "FINISHED" and r["windows"] == 2, r  # the windows ending at steps 4 and 6
        assert [s for s, _ in r["window_step_ms"]] == [4, 6] and r["step_ms"] > 0 and r["tokens_per_s"] > 0
    for name in ("ddp2-defaults-1k", "ddp2-b50-1k"):
        r = runs[name]
        assert r["efficiency"] == pytest.approx(r["tokens_per_s"] / 2 / runs["1gpu-1k"]["tokens_per_s"])
        assert r["efficiency_by_step"] == pytest.approx(runs["1gpu-1k"]["step_ms"] / r["step_ms"])
    assert runs["ddp2-b50-1k"]["overrides"] == ["ray.ddp_bucket_mb=50"] and "variant" not in runs["1gpu-1k"]
    assert "buckets of 50 MiB" in (out / "ddp2-b50-1k.log").read_text()
    assert "buckets of" not in (out / "ddp2-defaults-1k.log").read_text()
    assert "| 1,024 | 2 | ddp [b50] |" in (out / "scaling.md").read_text()


def test_scaling_summary_and_efficiency():
    from benchmarks.scaling import Layout, add_efficiency, layouts, summarize, table

    assert [lay.name for lay in layouts([1, 2], ["ddp", "fsdp"])] == ["1gpu", "ddp2", "fsdp2"]
    assert layouts([4], ["fsdp"]) == [Layout(4, "fsdp")]
    history = {"train/tokens_per_s": [(5, 10.0), (10, 100.0), (15, 120.0), (20, 110.0)],
               "train/data_wait_frac_max": [(5, 0.5), (15, 0.01), (20, 0.03)],
               "train/data_wait_frac": [(5, 0.4), (15, 0.005), (20, 0.02)],
               "train/lm_loss": [(20, 3.0), (5, 6.0)],
               "train/peak_reserved_gib": [(5, 30.0), (15, 29.0)]}
    s = summarize(history, measure_from=10)  # the start-up windows (steps 5 and 10) are left out
    # the run's peak memory is every window's, start-up included; no allocated figure logged: none
    assert s["peak_reserved_gib"] == 30.0 and s["peak_allocated_gib"] is None
    assert s["windows"] == 2 and s["tokens_per_s"] == 115.0
    assert s["data_wait_max"] == 0.03 and s["data_wait_mean"] == 0.02 and s["last_lm_loss"] == 3.0
    assert s["mfu"] is None
    assert s["window_tokens_per_s"] == [[15, 120.0], [20, 110.0]]
    assert (s["tokens_per_s_q1"], s["tokens_per_s_q3"]) == (112.5, 117.5)
    assert "step_ms" not in s  # no train/tokens_seen logged: no step time
    # a window's step time from its tokens and its tokens/s: the window (10, 15] trained 600 tokens at
    # 120 tokens/s in 5 steps (1 s a step), (15, 20] 440 at 110 (0.8 s); the start-up ones left out
    history["train/tokens_seen"] = [(5, 50.0), (10, 550.0), (15, 1150.0), (20, 1590.0)]
    s = summarize(history, measure_from=10)
    assert s["window_step_ms"] == [[15, pytest.approx(1000.0)], [20, pytest.approx(800.0)]]
    assert s["step_ms"] == pytest.approx(900.0)
    rows = [{"run": "1gpu-8k", "gpus": 1, "parallel": "-", "context": 8192, "tokens_per_s": 100.0, "exit_code": 0},
            {"run": "ddp2-8k", "gpus": 2, "parallel": "ddp", "context": 8192, "tokens_per_s": 190.0, "exit_code": 0},
            {"run": "ddp2-32k", "gpus": 2, "parallel": "ddp", "context": 32768, "tokens_per_s": 50.0, "exit_code": 0},
            {"run": "fsdp2-8k", "gpus": 2, "parallel": "fsdp", "context": 8192, "exit_code": 1}]
    add_efficiency(rows)
    assert rows[1]["tokens_per_s_per_gpu"] == 95.0 and rows[1]["efficiency"] == pytest.approx(0.95)
    assert "efficiency" not in rows[2]  # no one-GPU run at 32K to compare with
    assert "| 8,192 | 2 | ddp | 190 | 95 | 95.0% | - |" in table(rows)
    assert "efficiency_by_step" not in rows[1]  # no step times
    # by step time: the one-GPU step over the 2-GPU step, whatever the tokens/s say
    rows[0]["step_ms"], rows[1]["step_ms"] = 180.0, 200.0
    add_efficiency(rows)
    assert rows[1]["efficiency_by_step"] == pytest.approx(0.9) and rows[0]["efficiency_by_step"] == 1.0
    assert "| 200.0 | 90.0% |" in table(rows)
    assert "no run (rc 1)" in table(rows)
    rows[0].update(peak_allocated_gib=22.34, peak_reserved_gib=25.0)
    assert "| 22.3 / 25.0 | " in table(rows) and "| - / - | no run (rc 1) |" in table(rows)
    # the windows' quartiles bound the efficiency: this run's low against the base's high, and back
    rows[0].update(tokens_per_s_q1=90.0, tokens_per_s_q3=110.0)
    rows[1].update(tokens_per_s_q1=176.0, tokens_per_s_q3=198.0)
    add_efficiency(rows)
    assert rows[1]["efficiency_range"] == pytest.approx([0.8, 1.1])
    assert "efficiency_range" not in rows[0]
    assert "| 95.0% | 80%-110% |" in table(rows)
    # --cuda-graphs: graphed runs beside the eager ones (one GPU, and DDP); an eager row's efficiency
    # against the eager GPU, a graphed DDP row's against the graphed GPU, every row also against the latter
    assert [lay.name for lay in layouts([1, 2], ["ddp", "fsdp"], graphs=True)] == [
        "1gpu", "1gpu-graphs", "ddp2", "fsdp2", "ddp2-graphs"]
    assert [lay.name for lay in layouts([1, 2], ["fsdp"], graphs=True)] == ["1gpu", "1gpu-graphs", "fsdp2"]
    assert [lay.name for lay in layouts([1, 2], ["ddp"], graphs=True, graphs_only=True)] == ["1gpu-graphs", "ddp2-graphs"]
    assert [lay.name for lay in layouts([1, 2], ["fsdp"], graphs=True, graphs_only=True)] == ["1gpu-graphs"]
    rows.insert(1, {"run": "1gpu-graphs-8k", "gpus": 1, "parallel": "-", "graphs": True, "context": 8192,
                    "tokens_per_s": 160.0, "exit_code": 0})
    add_efficiency(rows)
    assert rows[0]["efficiency"] == 1.0 and rows[2]["efficiency"] == pytest.approx(0.95)
    assert "efficiency" not in rows[1] and rows[1]["speedup_over_eager"] == pytest.approx(1.6)
    assert rows[1]["vs_graphed_1gpu"] == 1.0 and rows[2]["vs_graphed_1gpu"] == pytest.approx(95 / 160)
    assert "vs_graphed_1gpu" not in rows[3]  # no graphed run at 32K
    assert "| 8,192 | 1 | - (CUDA graphs) | 160 | 160 | - | - | 100.0% |" in table(rows)
    assert "| 8,192 | 2 | ddp | 190 | 95 | 95.0% | 80%-110% | 59.4% |" in table(rows)
    rows.append({"run": "ddp2-graphs-8k", "gpus": 2, "parallel": "ddp", "graphs": True, "context": 8192,
                 "tokens_per_s": 288.0, "tokens_per_s_q1": 280.0, "tokens_per_s_q3": 300.0, "exit_code": 0})
    add_efficiency(rows)
    assert rows[-1]["efficiency"] == pytest.approx(0.9) and rows[-1]["vs_graphed_1gpu"] == pytest.approx(0.9)
    assert "speedup_over_eager" not in rows[-1]
    assert "| 8,192 | 2 | ddp (CUDA graphs) | 288 | 144 | 90.0% |" in table(rows)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_train_steps_cuda_graph_trains_like_the_eager_step():
    """benchmarks/train_steps.py --cuda-graph: a replay of the captured step (forward, backward,
    fused AdamW) is the eager step: six steps from the same weights on the same batch move every
    weight as six eager steps do (the exact KL: no sampled tokens, so both runs draw nothing). The
    updates are compared as a whole per parameter (a replay that skipped the optimizer, or reused
    stale gradients, would be a third or more off), not element by element: AdamW's sign-like first
    steps turn a last-bit difference of a tiny gradient into a visible one."""
    import dataclasses

    import torch

    from benchmarks.train_steps import _batch, _capture
    from model.presets import get_preset
    from model.transformer import MultimodalTransformer

    cfg = get_preset("tiny")
    # (the GPU presets' MoE dispatch: the padded-buffer one sizes its buffer on the host, no capture)
    cfg = dataclasses.replace(cfg, msa=dataclasses.replace(cfg.msa, backend="triton", kl_sample=1.0),
                              moe=dataclasses.replace(cfg.moe, dispatch="grouped_mm"))
    batch = _batch(cfg, 512, torch.device("cuda"))
    updates, losses = [], []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = MultimodalTransformer(cfg, img_patch_id=4).cuda()
        init = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        model.set_mode("sparse")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=graphed)
        w = model.loss_weights()

        def step():
            # (no cast cache in either: a captured step must cast the weights each replay, and the
            # eager one then does the same arithmetic)
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                out = model(batch)
            loss = sum(w[k] * v for k, v in out.losses.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return out

        if graphed:  # 3 eager warm-up steps inside _capture, then 3 replays (a capture runs nothing)
            graph, out = _capture(step, 3)
            seen = []
            for _ in range(3):
                graph.replay()
                seen.append(float(out.losses["lm"]))
        else:
            seen = [float(step().losses["lm"]) for _ in range(6)][3:]
        torch.cuda.synchronize()
        losses.append(seen)
        updates.append({n: p.detach().float() - init[n] for n, p in model.named_parameters()})
    assert losses[1][-1] < losses[1][0]  # the replays train
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
    for n, eager in updates[0].items():
        if eager.norm() > 0:
            assert (updates[1][n] - eager).norm() / eager.norm() < 0.05, n


def test_select_precision_bad_input_is_a_clear_error(tmp_path, capsys):
    from benchmarks.select_precision import main

    assert main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "neither a checkpoint nor a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--rows", "0", "--shards", str(tmp_path), "--tokenizer", str(tmp_path)])
    assert "--rows and --batch-size must be at least 1" in capsys.readouterr().err
