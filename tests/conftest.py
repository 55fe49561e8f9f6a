"""Shared test set-up and fixtures.

The Triton kernels run in the interpreter on machines without a GPU. TRITON_INTERPRET must be set
before any `@triton.jit` function is defined, i.e. before `kernels` is first imported, so it is set
here, at collection time, ahead of every test module.

Fixtures shared across folders are here; each folder's conftest.py has its own, and plain helper
functions live beside them in importable modules (tests/data_prep/prep_corpora.py,
tests/kernels/msa_numerics.py, tests/model/model_helpers.py).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test`'s unit phase: `-n 2` on a 2-core machine) each worker process keeps
# to one intra-op thread: two workers of torch's default one thread per core would run four spinning
# OpenMP threads on two cores, which makes small CPU ops tens of times slower (the same test: 0.1 s
# alone, 2.5 s oversubscribed). The serial slow phase keeps the default; Ray's workers set their own.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """A small demo corpus with its tokenizer, written once per test session by the real CLI."""
    from data_prep.cli import main as prep_main

    out = tmp_path_factory.mktemp("demo") / "shards"
    assert prep_main(["demo", "--output", str(out), "--documents", "400", "--max-chars", "2000",
                      "--shard-docs", "100", "--vocab-size", "2048"]) == 0
    return out


@pytest.fixture(scope="session")
def heldout_shards(tmp_path_factory):
    from data_prep.cli import main as prep_main

    out = tmp_path_factory.mktemp("heldout") / "shards"
    assert prep_main(["demo", "--output", str(out), "--documents", "80", "--max-chars", "2000", "--seed", "1",
                      "--vocab-size", "0"]) == 0
    return out


@pytest.fixture()
def local_ray():
    """A private local Ray (2 CPUs, no dashboard) for one test; only it is shut down afterwards."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def heldout_long_shards(tmp_path_factory):
    """Held-out documents as long as a 512-token row, retrieval questions spread up to that length
    (the study's evaluation set)."""
    from data_prep.cli import main as prep_main

    out = tmp_path_factory.mktemp("heldout_long") / "shards"
    assert prep_main(["demo", "--output", str(out), "--documents", "40", "--doc-tokens", "512", "--seed", "1",
                      "--retrieval-frac", "0.7", "--vocab-size", "0", "--quiet"]) == 0
    return out
