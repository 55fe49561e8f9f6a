"""ray_cluster.yaml is a valid cluster-launcher config (Ray's own schema) with the secure defaults."""
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_cluster_config_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load((REPO / "ray_cluster.yaml").read_text()))
    validate_config(cfg)  # raises on an unknown field or a wrong type
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith("p5") for t in workers)  # H100 nodes
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "msa-pretrain" in setup
    head = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head
