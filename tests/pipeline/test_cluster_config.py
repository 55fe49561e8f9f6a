"""ray_cluster.yaml is a valid cluster-launcher config (Ray's own schema) that would bring up nodes
with what the project needs: Python >= 3.11 (a Ray container image), the project installed, the auth
token on every node, shared storage mounted, MLflow on shared storage, and the secure defaults."""
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load((REPO / "ray_cluster.yaml").read_text()))
    validate_config(cfg)  # raises on an unknown field or a wrong type
    return cfg


def test_cluster_config_validates_against_ray_schema():
    cfg = _config()
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith("p5") for t in workers)  # H100 nodes


def test_nodes_run_python_311_and_the_project():
    import ray

    cfg = _config()
    image = cfg["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-gpu", image)
    assert m, image
    assert int(m.group(2)) >= 11  # the project needs Python 3.11+
    assert m.group(1).rsplit(".", 1)[0] == ray.__version__.rsplit(".", 1)[0]  # the Ray the project pins
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "msa-pretrain" in setup


def test_token_auth_and_shared_storage():
    cfg = _config()
    run_options = " ".join(cfg["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options and "RAY_AUTH_TOKEN_PATH" in run_options
    token_in_container = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", run_options).group(1)
    assert cfg["file_mounts"][token_in_container] == "~/.ray/auth_token"  # the laptop's token, on every node
    assert "-v /mnt/shared:/mnt/shared" in run_options
    init = " ".join(cfg["initialization_commands"])
    assert "mount -t nfs4" in init and "/mnt/shared" in init
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    # MLflow's store and artifacts outlive the cluster: on the shared file system, not the head's disk
    assert "sqlite:////mnt/shared/mlflow/" in head and "--artifacts-destination /mnt/shared/mlflow/" in head
