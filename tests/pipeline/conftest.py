"""Fixtures of the pipeline tests.

`train_ray`: one local Ray, started the way msa-train starts one (token auth, dashboard, the quiet
worker hook), shared by the end-to-end training tests of this folder and shut down after the last of
them. msa-train reuses a Ray this process is already connected to, so each test's runs skip Ray's
start and stop and its per-cluster helper actors (10-45 s a test, measured on 2 cores); every run
still gets its own Ray Train controller, workers and Ray Data pipeline. Tests that need a cluster of
their own (the two-node cluster, the study's lanes) start it themselves, the study after shutting the
shared one down (`without_shared_ray`).
"""
import pytest


@pytest.fixture(scope="package")
def train_ray():
    import ray

    from pipeline.train import start_local_ray

    if ray.is_initialized():
        pytest.fail("a test left this process connected to a Ray of its own")
    # 2 training workers + a packing actor + a reader, with room for a worker group that Ray Train is
    # still tearing down after a killed worker while the next one starts
    start_local_ray(num_cpus=8)
    yield ray
    ray.shutdown()


@pytest.fixture()
def without_shared_ray():
    """For a test that starts Rays of its own in other processes (the study's lanes): the shared Ray,
    if a test before it started one, is shut down first. Idle, its processes still took 50-115 s from
    the study on 2 cores (374 s without it, 423-489 s with it); a later `train_ray` user then trains
    on a Ray that msa-train starts for its run."""
    import ray

    ray.shutdown()


@pytest.fixture()
def local_ray(train_ray):
    """The shared Ray (tests/conftest.py's private one would clash with it in this process)."""
    return train_ray
