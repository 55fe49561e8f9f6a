"""Shared test set-up.

The Triton kernels run in the interpreter on machines without a GPU. TRITON_INTERPRET must be set
before any `@triton.jit` function is defined, i.e. before `kernels` is first imported, so it is set
here, at collection time, ahead of every test module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
