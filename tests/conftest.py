"""Shared test set-up.

The Triton kernels run in the interpreter on machines without a GPU. TRITON_INTERPRET must be set
before any `@triton.jit` function is defined, i.e. before `kernels` is first imported, so it is set
here, at collection time, ahead of every test module.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture(scope="session")
def heldout_long_shards(tmp_path_factory):
    """Held-out documents as long as a 512-token row, retrieval questions spread up to that length
    (the study's evaluation set)."""
    from data_prep.cli import main as prep_main

    out = tmp_path_factory.mktemp("heldout_long") / "shards"
    assert prep_main(["demo", "--output", str(out), "--documents", "40", "--doc-tokens", "512", "--seed", "1",
                      "--retrieval-frac", "0.7", "--vocab-size", "0", "--quiet"]) == 0
    return out
