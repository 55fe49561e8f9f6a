"""A multi-node Ray cluster on one machine, driven the way docs/cluster.md says:

- a token is created and handed to the head, the second node and the job client (RAY_AUTH_MODE=token,
  RAY_AUTH_TOKEN_PATH); a client without it is refused;
- a Ray head and a second Ray node as separate `ray start` processes (the head with 1 CPU, so the
  training workers and rank 0 run on the second node);
- an `mlflow server` on 127.0.0.1 (SQLite backend, artifacts served through its proxy);
- `ray job submit` of `msa-prep` (the data onto storage both nodes share), then of `msa-train` with
  its checkpoints on that storage;
then the run is checked through the MLflow server's REST API. Only the processes this test started
are stopped (SIGTERM to each `ray start --block` and to the MLflow server; never `ray stop`).
"""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait(predicate, what: str, procs: "Processes", timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        dead = [name for name, p in procs.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead[0]} exited while waiting for {what}:\n{procs.tail(dead[0])}")
        time.sleep(1.0)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


def _http(url: str, data: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
            try:
                return r.status, json.loads(body) if body else {}
            except json.JSONDecodeError:  # /health answers plain "OK"
                return r.status, {"text": body.decode(errors="replace")}
    except urllib.error.HTTPError as e:
        return e.code, {}
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, {}


class Processes:
    """The processes this test starts, each in its own session, stopped with SIGTERM at the end."""

    def __init__(self, log_dir: Path, env: dict):
        self.log_dir, self.env, self.procs = log_dir, env, []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append((name, p))
        return p

    def stop(self) -> None:
        for _, p in reversed(self.procs):  # the second node first, the head last
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)

    def tail(self, name: str, n: int = 3000) -> str:
        return (self.log_dir / f"{name}.log").read_text()[-n:]


def test_jobs_on_a_two_node_cluster_prepare_data_and_log_to_an_mlflow_server(tmp_path):
    token_path = tmp_path / "auth_token"
    token_path.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` makes
    token_path.chmod(0o600)
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: a `ray start --block` stopped with SIGTERM tears its node down
    # at once instead of first waiting up to 30 s for it to drain (for Ray Serve's proxies; nothing here
    # serves): the same SIGTERM, each node stopped in seconds
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token_path), "PYTHONUNBUFFERED": "1",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent1, agent2, mlflow_port = _free_ports(6)
    procs = Processes(tmp_path, env)
    ray = str(BIN / "ray")
    # Ray's session directory holds unix sockets, whose paths must stay under 108 bytes
    ray_tmp = Path(tempfile.mkdtemp(prefix="msa-ray-", dir="/tmp"))
    try:
        procs.start("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "--artifacts-destination", str(tmp_path / "mlartifacts"), "--workers", "1"])
        procs.start("head", [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent1}",
                             "--num-cpus=1", f"--temp-dir={ray_tmp}", "--disable-usage-stats"])
        api = f"http://127.0.0.1:{dash}"
        _wait(lambda: _http(f"{api}/api/version")[0] in (200, 401), "the Ray head's dashboard", procs)
        procs.start("node2", [ray, "start", "--block", "--node-ip-address=127.0.0.1", f"--address=127.0.0.1:{gcs}",
                              f"--dashboard-agent-listen-port={agent2}", "--num-cpus=4", "--disable-usage-stats"])
        mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
        _wait(lambda: _http(f"{mlflow_uri}/health")[0] == 200, "the MLflow server", procs)

        # a client without the token is refused
        assert _http(f"{api}/api/jobs/")[0] == 401
        _wait(lambda: len(json.loads(subprocess.run(
            [ray, "list", "nodes", "--address", api, "--format", "json", "--filter", "state=ALIVE"], env=env,
            capture_output=True, text=True, timeout=120).stdout or "[]")) == 2, "the second Ray node", procs)

        shared = tmp_path / "shared"  # storage both nodes see
        # the data onto the shared storage, as a Ray job
        prep = subprocess.run([ray, "job", "submit", "--address", api, "--working-dir", str(REPO), "--",
                               "python", "-m", "data_prep.cli", "demo", "--output", str(shared / "shards"),
                               "--documents", "120", "--max-chars", "2000", "--shard-docs", "30",
                               "--vocab-size", "2048", "--ray-address", "auto", "--quiet"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert prep.returncode == 0, (prep.stdout + prep.stderr)[-4000:]
        assert json.loads((shared / "shards" / "manifest.json").read_text())["documents"] == 120
        out_dir = shared / "runs"
        cmd = [ray, "job", "submit", "--address", api, "--working-dir", str(REPO), "--",
               "python", "-m", "pipeline.train", "--config", "configs/tiny.toml", "--address", "auto",
               "--tracking-uri", mlflow_uri,
               "--set", f"data.shards=['{shared / 'shards'}']", "--set", f"output_dir='{out_dir}'",
               "--set", "data.eval_shards=''", "--set", "train.eval_every=0",
               "--set", "model.n_layers=2", "--set", "train.max_steps=4", "--set", "train.log_every=2",
               "--set", "train.checkpoint_every=2", "--set", "tracking.experiment='cluster'",
               "--set", "tracking.run_name='on-two-nodes'"]
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-6000:] + procs.tail("head") + procs.tail("node2")
        assert "succeeded" in log and "[msa-train] done" in log
    finally:
        procs.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert all(p.poll() is not None for _, p in procs.procs)

    # the checkpoints are on the shared storage, named by step
    run_dir = out_dir / "ray" / "on-two-nodes"
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == ["checkpoint_000002", "checkpoint_000004"]

    # the run, through the MLflow server's REST API (restarted: the SQLite store outlives the server)
    procs = Processes(tmp_path, env)
    try:
        procs.start("mlflow2", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                                "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                "--artifacts-destination", str(tmp_path / "mlartifacts"), "--workers", "1"])
        _wait(lambda: _http(f"{mlflow_uri}/health")[0] == 200, "the MLflow server (again)", procs)
        rest = f"{mlflow_uri}/api/2.0/mlflow"
        status, exp = _http(f"{rest}/experiments/get-by-name?experiment_name=cluster")
        assert status == 200
        status, found = _http(f"{rest}/runs/search", {"experiment_ids": [exp["experiment"]["experiment_id"]]})
        (run,) = found["runs"]
        assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "on-two-nodes"
        run_id = run["info"]["run_id"]
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert tags["mode"] == "msa" and tags["training_complete"] == "true"
        assert params["train.max_steps"] == "4"
        _, hist = _http(f"{rest}/metrics/get-history?run_id={run_id}&metric_key=train/lm_loss")
        assert sorted(m["step"] for m in hist["metrics"]) == [2, 4]
        _, arts = _http(f"{rest}/artifacts/list?run_id={run_id}")
        names = {f["path"] for f in arts.get("files", [])}
        assert {"config.json", "data", "plots"} <= names, names
        _, data_arts = _http(f"{rest}/artifacts/list?run_id={run_id}&path=data")
        assert {"data/plan.json", "data/manifest_0.json"} <= {f["path"] for f in data_arts["files"]}
        # the artifacts went through the server's proxy into its artifact store
        assert list((tmp_path / "mlartifacts").rglob("config.json"))
        assert list((tmp_path / "mlartifacts").rglob("training_curves.png"))
    finally:
        procs.stop()
