"""The model's small elementwise ops (RMSNorm, RoPE, the SwiGLU gate, the MoE's weighted combine;
`fusable` also wraps the MSA layers' selection statistics in model/stats.py), each written once in
plain PyTorch and, on CUDA with `model.compile_ops` on, run through `torch.compile` so that each
becomes one or two fused kernels in the forward and the backward.

Why: in eager mode each of these is a chain of kernels that read and write fp32 copies of [tokens,
d_model] activations (a cast, a square, a mean, a multiply, another multiply, a cast back). At 32K
tokens they were about a third of the `small` preset's sparse step on the H200 (docs/perf/steps_h200.md),
more than the MSA kernels. Compiled, the math is the same expression: fp32 inside, the input dtype
out. Two differences, both within rounding: a reduction (the RMS) may sum in another order, and
where eager rounds a bf16 intermediate between two ops (silu(g) before the product with u) the fused
kernel keeps it in fp32 and rounds once. tests/model/test_fused.py holds both forms to fp64
references and a `small`-model step compiled to the same step eager.

CPU runs (the tests, the tiny demo) stay eager: compiling there buys nothing at these sizes and costs
seconds per shape. `dynamic=True`: row lengths and image counts change between batches, and one
symbolic-shape compile per function avoids a recompile for each.

    pytest -q tests/model/test_fused.py      # the eager forms against fp32 references (CPU);
                                            # the compiled forms on a GPU (marked gpu)
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_enabled = True


def set_enabled(flag: bool) -> None:
    """Compile the ops on CUDA (the model sets this from `model.compile_ops` when it is built)."""
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    return _enabled


def fusable(fn):
    """`fn` eager, or compiled on first use when its first argument is a CUDA tensor and fusion is on.
    `fn.eager` is the plain form (the tests compare the two)."""
    compiled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if _enabled and args[0].is_cuda:
            if compiled is None:
                compiled = torch.compile(fn, dynamic=True)
            return compiled(*args)
        return fn(*args)

    run.eager = fn
    return run


@fusable
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, in fp32 (bf16 sums of squares lose too much at large
    d_model), returned in x's dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


@fusable
def rope(x_BTHD: torch.Tensor, cos_BTF: torch.Tensor, sin_BTF: torch.Tensor) -> torch.Tensor:
    """Rotate the first rope_dim = 2F dims of each head (partial RoPE when rope_dim < D), half-split
    pairing, in fp32; the rest of each head passes through."""
    rd = cos_BTF.shape[-1] * 2
    x_rot, x_pass = x_BTHD[..., :rd].float(), x_BTHD[..., rd:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    cos, sin = cos_BTF[:, :, None, :], sin_BTF[:, :, None, :]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x_BTHD.dtype)
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated


@fusable
def rope_pair(q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, cos_BTF: torch.Tensor, sin_BTF: torch.Tensor):
    """`rope` of an attention's queries and keys in one call: each compiled call costs the host a
    guard check and a runtime wrapper in the forward and again in the backward, and at 8K tokens the
    step waits on the host (docs/perf/steps_h200.md)."""
    return rope.eager(q_BTHD, cos_BTF, sin_BTF), rope.eager(k_BTHD, cos_BTF, sin_BTF)


@fusable
def norm_rope_pair(q_BTHI: torch.Tensor, k_BTHI: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                   eps: float, cos_BTF: torch.Tensor, sin_BTF: torch.Tensor):
    """The MSA index branch's qi and ki: `rms_norm` (each its own weight), rounded to the input's dtype
    as the separate ops do, then `rope`; one call instead of four (see `rope_pair`)."""
    return (rope.eager(rms_norm.eager(q_BTHI, q_weight, eps), cos_BTF, sin_BTF),
            rope.eager(rms_norm.eager(k_BTHI, k_weight, eps), cos_BTF, sin_BTF))


@fusable
def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: silu(g) * u."""
    return F.silu(g) * u


@fusable
def weighted_sum(y_NKE: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """sum_k w[n, k] * y[n, k, :], fp32: a token's k expert outputs combined in a fixed order (no
    atomics)."""
    return (y_NKE.float() * w_NK[..., None]).sum(1)
