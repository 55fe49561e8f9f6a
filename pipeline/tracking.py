"""MLflow tracking behind a tiny interface with a no-op twin, so the training loop never asks
"is tracking on?" (rank 0 gets an MlflowTracker, the other ranks a NullTracker).

The driver creates (or, on resume, reopens) the run and passes its id to the workers: one MLflow run
per training run, the same run across restarts and resumes.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

# MLflow warns at import about optional extras; keep those out of the training logs
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description in the UI (Markdown)


def resolve_tracking_uri(cli_uri: str | None, config_uri: str) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the config's (a local SQLite file by default)."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or config_uri


def _client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """The project's own commit ("-dirty" with uncommitted changes), or "unknown": a checkout whose
    repository is not this project's (an installed copy inside another repository) says nothing.
    GIT_COMMIT, when set, wins: a copy of the tree shipped to another machine may carry no .git, or
    one that does not describe the files beside it."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    top = _git("rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != PROJECT_ROOT:
        return "unknown"
    sha = _git("rev-parse", "HEAD") or "unknown"
    return sha + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def source_tags(entry_point: str) -> dict[str, str]:
    """MLflow's standard source and user tags for a run started by `entry_point`."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    tags = {"mlflow.source.name": entry_point, "mlflow.user": user,
            "mlflow.source.type": "JOB" if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ else "LOCAL"}
    commit = git_commit()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


def open_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
             run_id: str | None = None) -> str:
    """Create the run (params + tags) or, given run_id, reopen it; returns the run id."""
    client = _client(uri)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        tags_now = client.get_run(run_id).data.tags
        for stale in END_TAGS:  # what the run's last end said is history now
            if stale in tags_now:
                client.delete_tag(run_id, stale)
        client.set_tag(run_id, "resumes", str(int(tags_now.get("resumes", "0")) + 1))
        return run_id
    exp = client.get_experiment_by_name(experiment)
    if exp:
        exp_id = exp.experiment_id
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    else:
        # a local store keeps its artifacts beside the database file, not in whatever directory a
        # worker happens to run in
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        # the UI opens an experiment in its model-training view (not the GenAI one) by this tag
        exp_id = client.create_experiment(experiment, artifact_location=location,
                                          tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    run = client.create_run(exp_id, run_name=run_name or None, tags=tags)
    from mlflow.entities import Param

    items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


# tags that describe how a run ended (set by the loop and the driver; cleared when it is resumed)
END_TAGS = ("training_complete", "failure_reason", "post_training_error", "final_checkpoint_error")


def close_run(uri: str, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    client = _client(uri)
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)
    client.set_terminated(run_id, status=status)


def set_description(uri: str, run_id: str, text: str) -> None:
    _client(uri).set_tag(run_id, DESCRIPTION_TAG, text)


def final_metrics(uri: str, run_id: str, keys: tuple[str, ...]) -> dict[str, float]:
    """The last logged value of each of `keys` that the run has."""
    have = _client(uri).get_run(run_id).data.metrics
    return {k: have[k] for k in keys if k in have}


def run_page_url(uri: str, run_id: str, ui_base: str = "http://127.0.0.1:5000") -> str:
    """The run's page in the MLflow UI (the server's own address for an http(s) tracking URI, else where
    `mlflow ui` serves by default), in the model-training view: MLflow 3's UI opens its GenAI view
    unless the link asks for the other one."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else ui_base
    exp_id = _client(uri).get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning"


def run_completed(uri: str, run_id: str) -> bool:
    """Did the run train and log its last step (the loop tags it so before its final checkpoint)?"""
    return _client(uri).get_run(run_id).data.tags.get("training_complete") == "true"


def log_dict_artifact(uri: str, run_id: str, body: dict, name: str) -> None:
    """A JSON artifact of the run (the resolved config, the data plan), through the tracking server."""
    _client(uri).log_dict(run_id, body, name)


class NullTracker:
    """The no-op twin: every rank but 0."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


class MlflowTracker(NullTracker):
    """Logs to one run. After a restart from a checkpoint, the steps between the checkpoint and the
    failure are trained again; their metrics are already in the run, so they are not logged twice
    (each step appears once in the run's history)."""

    def __init__(self, uri: str, run_id: str, progress_key: str = "train/lm_loss"):
        self.client = _client(uri)
        self.run_id = run_id
        history = self.client.get_metric_history(run_id, progress_key)
        self.logged_through = max((m.step for m in history), default=-1)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.logged_through:
            return

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in sorted(metrics.items())]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)


def start_system_metrics(uri: str, run_id: str, interval_s: float):
    """MLflow's system metrics monitor for the run on this node (a background thread logging
    system/* every interval_s; it stops when the run is no longer RUNNING or on .finish()).
    Returns (monitor or None, a line saying what is sampled or why nothing is)."""
    try:
        import psutil  # noqa: F401  (the CPU, memory, disk and network monitors)
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as e:
        return None, f"system metrics off: {e}"
    # no node id: one node samples, and MLflow's UI shows system metrics under their plain names
    mon = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=uri)
    mon.start()
    kinds = sorted(type(m).__name__.removesuffix("Monitor").lower() for m in mon.monitors)
    return mon, f"system metrics every {interval_s:g} s: {', '.join(kinds)}"


def make_tracker(rank: int, uri: str, run_id: str | None) -> NullTracker:
    return MlflowTracker(uri, run_id) if rank == 0 and run_id else NullTracker()
