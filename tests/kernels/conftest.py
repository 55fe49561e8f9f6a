"""Fixtures of the kernel tests: every test runs with outputs poisoned (NaN / -2) and a fresh seed.

Run: `pytest -q tests/kernels` (CPU: Triton interpreter, set up by tests/conftest.py).
"""
import zlib

import pytest
import torch

from kernels import _common


@pytest.fixture(autouse=True)
def _poison_and_seed(request):
    # A different but reproducible seed per test: fresh inputs, repeatable failures.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    with _common.poisoned_outputs():
        yield


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
