"""Data-parallel scaling of `msa-train` on one host: DDP and FSDP2 on N GPUs against one GPU, the data
wait of the worst-fed worker, and recovery from a training worker killed by its pid.

    python -m benchmarks.scaling --gpus 1 2 --contexts 8192 32768 --out runs/scaling \\
        --set "data.shards=['runs/scaling/data']"                        # a 2-GPU host
    python -m benchmarks.scaling --gpus 2 --kill-only --out runs/scaling ...   # the kill test alone
    python -m benchmarks.scaling --cpu --config configs/tiny.toml --gpus 1 2 --contexts 1024 \\
        --steps 8 --measure-from 4 --log-every 2 --out runs/scaling-cpu   # checks the script (gloo)

Every measurement is a real `msa-train` run (a subprocess: Ray Train, the Ray Data pipeline, MLflow)
of the config with one row of `context` tokens per GPU per step (weak scaling: the global batch grows
with the GPUs), native MSA with a dense warm-up of `--warmup-steps` steps, then sparse. The figures
come back from the MLflow store: tokens/s is the median over the logging windows after step
`--measure-from` (the earlier ones hold start-up and compilation), per GPU and against one GPU at the
same context (scaling efficiency). tokens/s counts the rows' real tokens, so a window's figure also
moves with how much of its rows is padding; the step time (a window's time per step, the median over
the same windows) does not, and the efficiency by step time is the one-GPU step's time over the
N-GPU step's. Data wait is `train/data_wait_frac_max`, the worst-fed worker's share of a window spent
waiting for its batch, at its largest over the measured windows.

The kill test (`--kill`, on by default with more than one GPU): DDP on the most GPUs, worker 1
stops after step `--kill-at` and this script kills it with SIGKILL by its pid; Ray Train restarts
the worker group from the last checkpoint. Passes when the run ends FINISHED in MLflow as one run,
every logged step once, and the data trace shows every step trained and no piece of a document twice.
`--kill-cuda-graphs` runs it with `train.cuda_graphs`, longer (44 steps, a checkpoint every 24,
worker 1 killed after step 32, not a logging step), so that both attempts replay captured steps: the
survivor then fails at the next step's exchange of layouts (pipeline/graphs.py) instead of waiting in
an all-reduce.

`--cuda-graphs` adds runs with `train.cuda_graphs` (the step captured and replayed) at each context:
one GPU, and DDP on each GPU count above one. An eager row's scaling efficiency is against the eager
one-GPU run, a graphed DDP row's against the graphed one (like for like), and every row also gives
its per-GPU rate against the graphed GPU (`vs_graphed_1gpu`: what several GPUs buy over one graphed
GPU; the graphed GPU's speed-up over the eager one is `speedup_over_eager`). `--graphs-only` runs
the graphed runs alone (one GPU, and DDP on the larger counts: their efficiency against the graphed
GPU), for a call whose eager figures are measured elsewhere.

`--variant "NAME KEY=VALUE ..."` (repeatable) runs the layouts on more than one GPU once per variant,
each with its settings on top of `--set`, against the same one-GPU base: several settings of FSDP2 or
DDP in one call, e.g. `--parallel fsdp --variant defaults --variant "bf16 ray.fsdp_param_dtype='bf16'"`.
A variant of FSDP2's settings alone (`ray.fsdp_*`) skips the DDP runs and one of DDP's alone
(`ray.ddp_*`) the FSDP2 runs; a run that no variant concerns runs once as `--set` leaves it.

NCCL: NVLink multicast (NVLS) stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 are set where unset; the local Ray's workers inherit this environment).
Writes scaling.json (every run's figures and the environment) and scaling.md (the table) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

EXPERIMENT = "scaling"
# leave NVLink multicast off: on shared hosts a program using it can take the GPUs out of service
NCCL_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
METRICS = ("train/tokens_per_s", "train/tokens_seen", "train/data_wait_frac", "train/data_wait_frac_max", "train/mfu",
           "train/sparsity", "train/lm_loss", "train/peak_allocated_gib", "train/peak_reserved_gib")


@dataclass(frozen=True)
class Layout:
    gpus: int
    parallel: str  # "ddp" | "fsdp"; one GPU runs plain (the DDP path with one worker)
    graphs: bool = False  # train.cuda_graphs (one GPU, or DDP)
    variant: str = ""  # a --variant's name: its settings on top of --set (runs on more than one GPU)
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return (("1gpu" if self.gpus == 1 else f"{self.parallel}{self.gpus}") + ("-graphs" if self.graphs else "")
                + (f"-{self.variant}" if self.variant else ""))


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """--variant "NAME KEY=VALUE ...": a name (letters, digits, - and _) and the settings it adds (none:
    the layout as --set leaves it)."""
    name, *sets = text.split() or [""]
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not all("=" in s for s in sets):
        raise ValueError(f"--variant {text!r}: expected a name (letters, digits, - and _) and KEY=VALUE settings, "
                         f"e.g. \"bf16 ray.fsdp_param_dtype='bf16'\"")
    return name, tuple(sets)


def layouts(gpus: list[int], parallel: list[str], graphs: bool = False, graphs_only: bool = False,
            variants: list[tuple[str, tuple[str, ...]]] = ()) -> list[Layout]:
    """The runs at one context: the one-GPU base(s) first, then every layout on more GPUs, once per
    variant that concerns it where there are variants (`concerns`; the base is the same for all of
    them: one run less per variant than a call of this script per variant)."""
    if graphs_only:
        out = [Layout(1, "ddp", graphs=True)]
        more = [Layout(n, "ddp", graphs=True) for n in sorted(set(gpus) - {1})] if "ddp" in parallel else []
    else:
        out = [Layout(1, "ddp")] if 1 in gpus else []
        out += [Layout(1, "ddp", graphs=True)] if graphs else []
        more = []
        for n in sorted(set(gpus) - {1}):
            more += [Layout(n, p) for p in parallel] + ([Layout(n, "ddp", graphs=True)] if graphs and "ddp" in parallel else [])
    if variants:
        runs = []
        for lay in more:
            mine = [(name, sets) for name, sets in variants if concerns(sets, lay)]
            runs += [replace(lay, variant=name, overrides=sets) for name, sets in mine] or [lay]
        more = runs
    return out + more


def concerns(sets: tuple[str, ...], layout: Layout) -> bool:
    """Whether a variant's settings concern a layout: settings of FSDP2 alone (`ray.fsdp_*`) not a
    DDP run, settings of DDP alone (`ray.ddp_*`) not an FSDP2 run, anything else every run (no
    settings included). So `--parallel ddp fsdp --variant defaults --variant "tuned ray.fsdp_..."`
    runs DDP once and FSDP2 twice."""
    keys = [s.split("=", 1)[0].strip() for s in sets]
    for parallel in ("ddp", "fsdp"):
        if keys and all(k.startswith(f"ray.{parallel}_") for k in keys):
            return layout.parallel == parallel
    return True


def train_argv(args, layout: Layout, context: int, name: str, steps: int, extra: list[str]) -> list[str]:
    sets = {
        "tracking.experiment": f"'{EXPERIMENT}'", "tracking.run_name": f"'{name}'",
        "output_dir": f"'{args.out / 'runs'}'", "data.seq_len": context,
        "ray.num_workers": layout.gpus, "ray.parallel": f"'{layout.parallel}'",
        "ray.use_gpu": "false" if args.cpu else "true",
        "train.max_steps": steps, "train.log_every": args.log_every,
        "train.stats_every": steps + 1,  # the recall statistics run dense attention: not in a timing run
        "train.eval_every": 0, "train.checkpoint_every": steps + 1, "train.final_checkpoint": "false",
        "schedule.mode": "'msa'", "schedule.warmup_tokens": args.warmup_steps * layout.gpus * context,
        "train.cuda_graphs": "true" if layout.graphs else "false",
    }
    if args.cpu:
        sets["train.dtype"] = "'float32'"
    argv = ["--config", str(args.config), "--tracking-uri", args.tracking_uri]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    for s in list(args.overrides) + list(layout.overrides) + extra:
        argv += ["--set", s]
    return argv


def run_training(args, argv: list[str], name: str) -> tuple[int, float]:
    """One msa-train process; its output goes to <out>/<name>.log, each line stamped with the seconds
    since the process started (where a run's time goes besides its steps: start-up, compilation,
    wind-down). Returns (exit code, seconds)."""
    log = args.out / f"{name}.log"
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # (stamped as they come, not as a buffer fills)
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env)
        copier = threading.Thread(target=_stamp_lines, args=(proc.stdout, f, t0), daemon=True)
        copier.start()
        stopped = False
        try:
            rc = proc.wait(timeout=args.run_timeout_s or None)
        except subprocess.TimeoutExpired:
            stopped = True
            proc.send_signal(signal.SIGINT)  # msa-train marks the MLflow run KILLED on an interrupt
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        copier.join(timeout=10)  # the run's last lines in, then ours
        if stopped:
            f.write(f"\n[scaling] stopped after --run-timeout-s {args.run_timeout_s}\n".encode())
    return rc, time.time() - t0


def _stamp_lines(src, dst, t0: float) -> None:
    for line in iter(src.readline, b""):
        dst.write(f"[{time.time() - t0:7.1f}s] ".encode() + line)
        dst.flush()


def mlflow_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'") if exp else []
    return client, runs


def summarize(history: dict[str, list[tuple[int, float]]], measure_from: int) -> dict:
    """history: metric -> [(step, value)] of one run. The windows logged after `measure_from`:
    median tokens/s, MFU and sparsity, the largest data wait (worst-fed worker and mean)."""
    def after(key):
        return [v for s, v in sorted(history.get(key, [])) if s > measure_from]

    # every measured window, and their quartiles: a host-bound step's windows spread by +-15%
    windows = [[s, v] for s, v in sorted(history.get("train/tokens_per_s", [])) if s > measure_from]
    tps = [v for _, v in windows]
    out = {"windows": len(tps), "tokens_per_s": statistics.median(tps) if tps else None,
           "window_tokens_per_s": windows}
    if len(tps) >= 2:
        q1, _, q3 = statistics.quantiles(tps, n=4, method="inclusive")
        out.update(tokens_per_s_q1=q1, tokens_per_s_q3=q3)
    # each window's step time: its tokens (the difference of train/tokens_seen, every worker's) over its
    # tokens/s, per step. tokens/s counts the rows' real tokens, and how much of a row is padding
    # varies from window to window (a 32K row of long documents: about a quarter); a step computes
    # every position of its rows, so its time does not depend on that
    seen = dict(history.get("train/tokens_seen", []))
    tps_at, logged = dict(history.get("train/tokens_per_s", [])), sorted(seen)
    step_ms = [[cur, 1e3 * (seen[cur] - seen[prev]) / tps_at[cur] / (cur - prev)]
               for prev, cur in zip(logged, logged[1:])
               if cur > measure_from and prev >= measure_from and tps_at.get(cur)]
    if step_ms:
        out.update(step_ms=statistics.median(v for _, v in step_ms), window_step_ms=step_ms)
    for key, name in (("train/mfu", "mfu"), ("train/sparsity", "sparsity")):
        vals = after(key)
        out[name] = statistics.median(vals) if vals else None
    for key, name in (("train/data_wait_frac_max", "data_wait_max"), ("train/data_wait_frac", "data_wait_mean")):
        vals = after(key)
        out[name] = max(vals) if vals else None
    for key, name in (("train/peak_allocated_gib", "peak_allocated_gib"), ("train/peak_reserved_gib", "peak_reserved_gib")):
        vals = [v for _, v in history.get(key, [])]  # the run's peak: every window, start-up included
        out[name] = max(vals) if vals else None
    loss = history.get("train/lm_loss", [])
    out["last_lm_loss"] = sorted(loss)[-1][1] if loss else None
    return out


def add_efficiency(rows: list[dict]) -> None:
    """Per-GPU tokens/s and scaling efficiency against the one-GPU run of the same kind at the same
    context (eager rows against the eager GPU, graphed DDP against the graphed GPU); with a graphed
    one-GPU run there too, every row's per-GPU rate against it."""
    single = {r["context"]: r for r in rows if r["gpus"] == 1 and not r.get("graphs") and r.get("tokens_per_s")}
    graphed = {r["context"]: r for r in rows if r["gpus"] == 1 and r.get("graphs") and r.get("tokens_per_s")}
    for r in rows:
        if r.get("tokens_per_s") is None:
            continue
        r["tokens_per_s_per_gpu"] = r["tokens_per_s"] / r["gpus"]
        if r["context"] in graphed:
            r["vs_graphed_1gpu"] = r["tokens_per_s_per_gpu"] / graphed[r["context"]]["tokens_per_s"]
        base = (graphed if r.get("graphs") and r["gpus"] > 1 else single).get(r["context"])
        if base and r.get("graphs") and r["gpus"] == 1:  # not a scaling figure: what the graphs buy on one GPU
            r["speedup_over_eager"] = r["tokens_per_s"] / base["tokens_per_s"]
        elif base:
            r["efficiency"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s"]
            if r.get("step_ms") and base.get("step_ms"):
                # weak scaling (each GPU its own rows of the same length): the one-GPU step's time over
                # this one's, whatever share of the rows the padding took in either run's windows
                r["efficiency_by_step"] = base["step_ms"] / r["step_ms"]
            if r is not base and "tokens_per_s_q1" in r and "tokens_per_s_q1" in base:
                # how far the windows' spread leaves the figure: this run's quartiles against the base's
                r["efficiency_range"] = [r["tokens_per_s_q1"] / r["gpus"] / base["tokens_per_s_q3"],
                                         r["tokens_per_s_q3"] / r["gpus"] / base["tokens_per_s_q1"]]


def measure(args, layout: Layout, context: int) -> dict:
    name = f"{layout.name}-{context // 1024}k"
    rc, secs = run_training(args, train_argv(args, layout, context, name, args.steps, []), name)
    row = {"run": name, "gpus": layout.gpus, "parallel": layout.parallel if layout.gpus > 1 else "-",
           "graphs": layout.graphs, "context": context, "steps": args.steps, "exit_code": rc, "wall_s": round(secs, 1)}
    if layout.variant:
        row.update(variant=layout.variant, overrides=list(layout.overrides))
    client, runs = mlflow_run(args.tracking_uri, name)
    if runs:
        run = runs[0]
        history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in METRICS}
        row.update(status=run.info.status, run_id=run.info.run_id, **summarize(history, args.measure_from))
    _drop_checkpoints(args, name)
    return row


def kill_test(args, gpus: int, context: int) -> dict:
    from pipeline.trace import Killer, exactly_once_problems

    layout = Layout(gpus, "ddp", graphs=args.kill_cuda_graphs)
    name = f"kill-{layout.name}-{context // 1024}k"
    steps, every = args.kill_steps, args.kill_checkpoint_every
    extra = [f"train.checkpoint_every={every}", f"debug.pause_at_step={args.kill_at}",
             "debug.pause_rank=1", "debug.trace_data=true", "ray.max_failures=1"]
    killer = Killer(args.out / "runs" / "ray", rank=1, step=args.kill_at)
    killer.start()
    try:
        rc, secs = run_training(args, train_argv(args, layout, context, name, steps, extra), name)
    finally:
        killer.stop = True
    result = {"run": name, "gpus": gpus, "context": context, "steps": steps, "killed_after_step": args.kill_at,
              "checkpoint_every": every, "killed_pid": killer.killed, "exit_code": rc, "wall_s": round(secs, 1)}
    client, runs = mlflow_run(args.tracking_uri, name)
    problems = [] if killer.killed else ["the paused worker was never killed"]
    if len(runs) != 1:
        problems.append(f"{len(runs)} MLflow runs named {name}, expected 1")
    if runs:
        run = runs[0]
        result.update(status=run.info.status, run_id=run.info.run_id, attempts=run.data.tags.get("attempts"))
        if run.info.status != "FINISHED":
            problems.append(f"MLflow status {run.info.status}")
        # windows are logged every log_every steps, at every checkpoint and at the last step
        expected = sorted(set(range(args.log_every, steps + 1, args.log_every)) | set(range(every, steps + 1, every))
                          | {steps})
        for key in ("train/lm_loss", "train/tokens_per_s"):
            logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            if logged != expected:
                problems.append(f"{key} logged at steps {logged}, expected each of {expected} once")
    log = (args.out / f"{name}.log").read_text(errors="replace")
    resumed = [line.strip() for line in log.splitlines() if "resumed at step" in line]
    result["resumed"] = resumed[-1] if resumed else None
    if not resumed:
        problems.append("no worker resumed from a checkpoint")
    problems += exactly_once_problems(args.out / "runs" / "ray" / name, steps)
    result.update(problems=problems, passed=not problems)
    _drop_checkpoints(args, name)
    return result


def _drop_checkpoints(args, name: str) -> None:
    """The small preset's checkpoint is ~9 GB with its optimizer state; a host's disk holds a few."""
    import shutil

    for ckpt in (args.out / "runs" / "ray" / name).glob("checkpoint_*"):
        shutil.rmtree(ckpt, ignore_errors=True)


def environment(args) -> dict:
    from pipeline.tracking import git_commit

    env = {"host": platform.node(), "python": platform.python_version(),
           "commit": git_commit(),  # GIT_COMMIT where the copy of the tree on the GPU host has no (or a stale) .git
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "nccl_env": {k: os.environ.get(k) for k in sorted(os.environ) if k.startswith(("NCCL_", "TORCH_SYMM", "NVSHMEM_"))}}
    try:
        import torch
        import triton

        env.update(torch=torch.__version__, triton=triton.__version__)
        if torch.cuda.is_available():
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:  # the figures matter more than the description of the machine
        env["error"] = repr(e)
    if not args.cpu:
        for key, cmd in (("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                         ("topology", ["nvidia-smi", "topo", "-m"])):
            try:
                text = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
                env[key] = re.sub(r"\x1b\[[0-9;]*m", "", text)  # nvidia-smi underlines the header
            except (OSError, subprocess.TimeoutExpired) as e:
                env[key] = repr(e)
    return env


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    graphs = any(r.get("graphs") for r in rows)
    lines = ["| context | GPUs | parallel | tokens/s | per GPU | scaling eff. | eff. from the windows' quartiles "
             + ("| per GPU vs 1 GPU graphed " if graphs else "")
             + "| step ms | eff. by step time | MFU | data wait (worst rank) | sparsity | peak GiB, allocated / reserved "
               "| status |",
             "|---:|---:|---|---:|---:|---:|---|" + ("---:|" if graphs else "") + "---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lo_hi = r.get("efficiency_range")
        spread = f"{lo_hi[0]:.0%}-{lo_hi[1]:.0%}" if lo_hi else "-"
        parallel = (r["parallel"] + (" (CUDA graphs)" if r.get("graphs") else "")
                    + (f" [{r['variant']}]" if r.get("variant") else ""))
        lines.append(f"| {r['context']:,} | {r['gpus']} | {parallel} | {f(r.get('tokens_per_s'), ',.0f')} "
                     f"| {f(r.get('tokens_per_s_per_gpu'), ',.0f')} | {f(r.get('efficiency'), '.1%')} | {spread} "
                     + (f"| {f(r.get('vs_graphed_1gpu'), '.1%')} " if graphs else "")
                     + f"| {f(r.get('step_ms'), ',.1f')} | {f(r.get('efficiency_by_step'), '.1%')} "
                     f"| {f(r.get('mfu'), '.1%')} | {f(r.get('data_wait_max'), '.2%')} | {f(r.get('sparsity'), '.2f')} "
                     f"| {f(r.get('peak_allocated_gib'), '.1f')} / {f(r.get('peak_reserved_gib'), '.1f')} "
                     f"| {r.get('status', 'no run')} (rc {r['exit_code']}) |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=Path("configs/small.toml"))
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="worker counts (one GPU each)")
    p.add_argument("--parallel", nargs="+", default=["ddp", "fsdp"], choices=("ddp", "fsdp"))
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    # steps are cheap beside a run's start (about 1.5 minutes), and at 8K the 5-step windows of one run
    # spread by +-15%: 100 steps give 18 windows after step 10
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup-steps", type=int, default=2, help="dense warm-up steps before sparse attention")
    p.add_argument("--measure-from", type=int, default=10, help="windows logged after this step count")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--kill", action=argparse.BooleanOptionalAction, default=None,
                   help="the kill test on the most GPUs (default: on when more than one)")
    p.add_argument("--kill-only", action="store_true", help="only the kill test")
    p.add_argument("--kill-context", type=int, default=0, help="its context (default: the first of --contexts)")
    # (defaults: 20, 15, 12; with --kill-cuda-graphs 44, 32, 24, so that both attempts replay graphs:
    # a process captures after 11 steps under DDP)
    p.add_argument("--kill-steps", type=int, default=None)
    p.add_argument("--kill-at", type=int, default=None, help="worker 1 is killed after this step")
    p.add_argument("--kill-checkpoint-every", type=int, default=None)
    p.add_argument("--kill-cuda-graphs", action="store_true",
                   help="the kill test's run with train.cuda_graphs (longer, so that both attempts replay "
                        "captured steps)")
    p.add_argument("--run-timeout-s", type=float, default=0, help="stop a run after this long (0: no limit)")
    p.add_argument("--cpu", action="store_true", help="workers on CPUs (gloo), to check the script")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also train.cuda_graphs runs at each context: one GPU, and DDP on each GPU count "
                        "(needs --gpus 1)")
    p.add_argument("--graphs-only", action="store_true",
                   help="only the graphed runs at each context (implies --cuda-graphs): one GPU, and DDP on the "
                        "larger counts against it; no eager rows (for a call whose eager figures are measured "
                        "elsewhere)")
    p.add_argument("--variant", dest="variants", action="append", default=[], metavar='"NAME KEY=VALUE ..."',
                   help="run the layouts on more than one GPU with these settings, against the same one-GPU base "
                        "(repeatable: the layouts run once per variant; a variant without settings, e.g. "
                        "--variant defaults, keeps the plain row; one of ray.fsdp_* or ray.ddp_* settings alone "
                        "runs with that parallelism only)")
    p.add_argument("--tracking-uri", default="", help="default: a SQLite file in --out")
    p.add_argument("--out", type=Path, default=Path("runs/scaling"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every msa-train run (data.shards, model fields, ...)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.cuda_graphs = args.cuda_graphs or args.graphs_only
    try:
        variants = [parse_variant(v) for v in args.variants]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if len({name for name, _ in variants}) < len(variants):
        raise SystemExit("--variant: two variants of the same name")
    planned = [] if args.kill_only else layouts(args.gpus, args.parallel, args.cuda_graphs, args.graphs_only, variants)
    if any(lay.gpus > 1 for lay in planned):  # (one GPU alone, a dry run: no variant runs)
        unused = [name for name, _ in variants if name not in {lay.variant for lay in planned}]
        if unused:
            raise SystemExit(f"--variant {', '.join(unused)}: its settings concern none of the runs (--parallel "
                             f"{' '.join(args.parallel)}{', --graphs-only' if args.graphs_only else ''})")
    for name, plain, graphed in (("kill_steps", 20, 44), ("kill_at", 15, 32), ("kill_checkpoint_every", 12, 24)):
        if getattr(args, name) is None:
            setattr(args, name, graphed if args.kill_cuda_graphs else plain)
    if args.cuda_graphs and (args.cpu or 1 not in args.gpus):
        raise SystemExit("--cuda-graphs runs one GPU with train.cuda_graphs: it needs a GPU and --gpus 1")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.tracking_uri = args.tracking_uri or f"sqlite:///{args.out / 'mlflow.db'}"
    for k, v in NCCL_DEFAULTS.items():
        os.environ.setdefault(k, v)
    results_path = args.out / "scaling.json"
    results = {"environment": environment(args), "args": {k: str(v) if isinstance(v, Path) else v
                                                           for k, v in vars(args).items()}, "runs": [], "kill": None}

    def save():
        add_efficiency(results["runs"])
        results_path.write_text(json.dumps(results, indent=1))
        text = table(results["runs"])
        if results["kill"]:
            k = results["kill"]
            text += (f"\n\nKill test ({k['run']}): worker 1 killed (pid {k['killed_pid']}) after step "
                     f"{k['killed_after_step']}; {k.get('resumed')}; MLflow {k.get('status')}; "
                     f"{'PASSED' if k['passed'] else 'FAILED: ' + '; '.join(k['problems'])}")
        (args.out / "scaling.md").write_text(text + "\n")
        return text

    if not args.kill_only:
        for context in args.contexts:
            for layout in planned:
                print(f"[scaling] {layout.name} at {context:,} tokens ...", flush=True)
                results["runs"].append(measure(args, layout, context))
                print(save().splitlines()[-1], flush=True)
    most = max(args.gpus)
    if args.kill_only or (args.kill if args.kill is not None else most > 1):
        if most < 2:
            raise SystemExit("--kill needs at least 2 workers (--gpus)")
        print(f"[scaling] kill test on {most} workers ...", flush=True)
        results["kill"] = kill_test(args, most, args.kill_context or args.contexts[0])
    print(save())
    ok = all(r.get("status") == "FINISHED" for r in results["runs"]) and (results["kill"] or {"passed": True})["passed"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
