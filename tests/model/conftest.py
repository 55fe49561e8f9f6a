"""Fixtures of the model tests. Helpers (synthetic batches, small configs) are in model_helpers.py.

Run: `pytest -q tests/model` (CPU; the Triton path runs in the interpreter, set up by tests/conftest.py).
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
