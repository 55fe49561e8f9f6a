"""model/fused.py: each small op against an independent fp64 reference, forward and gradients; the
eager form on CPU, the compiled form on CUDA (marked gpu), and a `small`-model step with the ops
compiled against the same step eager.

    pytest -q tests/model/test_fused.py
"""
from __future__ import annotations

import math

import pytest
import torch

from model import fused

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled form runs on CUDA only")


def _ref_rms_norm(x, w, eps):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def _ref_rope(x_BTHD, cos_BTF, sin_BTF):
    # rotation of the complex number (x_i + i x_{i+F}) by the angle whose cos/sin are given
    F_ = cos_BTF.shape[-1]
    x = x_BTHD.double()
    z = torch.complex(x[..., :F_], x[..., F_:2 * F_])
    rot = torch.complex(cos_BTF.double(), sin_BTF.double())[:, :, None, :]
    zr = z * rot
    return torch.cat((zr.real, zr.imag, x[..., 2 * F_:]), -1)


def _ref_silu_mul(g, u):
    g = g.double()
    return g / (1 + torch.exp(-g)) * u.double()


def _ref_weighted_sum(y_NKE, w_NK):
    return torch.einsum("nke,nk->ne", y_NKE.double(), w_NK.double())


def _cat(op):
    """A pair op as one output (both flattened, concatenated), so `_check` compares each element."""
    def run(*args):
        return torch.cat([x.reshape(-1) for x in op(*args)])
    return run


def _cases(device, dtype):
    g = torch.Generator().manual_seed(0)

    def r(*s, lo=None):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    B, T, H, D, F_ = 2, 37, 3, 16, 6  # partial RoPE: 12 of 16 dims rotated
    ang = torch.rand(B, T, F_, generator=g) * 2 * math.pi
    N, K, E = 29, 4, 24
    w = torch.rand(N, K, generator=g)
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    wq, wk = (1 + 0.1 * torch.randn(D, generator=g)).to(device), (1 + 0.1 * torch.randn(D, generator=g)).to(device)
    return {
        "rms_norm": (fused.rms_norm, _ref_rms_norm, (r(B, T, E), (1 + 0.1 * torch.randn(E, generator=g)).to(device)),
                     (1e-5,)),
        # the pairs: queries and keys of another head count (GQA), each against the composed references
        "rope_pair": (_cat(fused.rope_pair), _cat(lambda q, k, c, s_: (_ref_rope(q, c, s_), _ref_rope(k, c, s_))),
                      (r(B, T, H, D), r(B, T, 1, D)), (cos, sin)),
        "norm_rope_pair": (_cat(fused.norm_rope_pair),
                           _cat(lambda q, k, a, b, eps, c, s_: (_ref_rope(_ref_rms_norm(q, a, eps), c, s_),
                                                                _ref_rope(_ref_rms_norm(k, b, eps), c, s_))),
                           (r(B, T, H, D), r(B, T, 1, D), wq, wk), (1e-5, cos, sin)),
        "rope": (fused.rope, _ref_rope, (r(B, T, H, D),), (ang.cos().to(device), ang.sin().to(device))),
        "silu_mul": (fused.silu_mul, _ref_silu_mul, (r(N, E), r(N, E)), ()),
        "weighted_sum": (fused.weighted_sum, _ref_weighted_sum, (r(N, K, E), (w / w.sum(1, keepdim=True)).to(device)),
                         ()),
    }


def _check(device, dtype, atol, rtol):
    for name, (op, ref, grad_args, const_args) in _cases(device, dtype).items():
        args = [a.clone().requires_grad_() for a in grad_args]
        out = op(*args, *const_args)
        ref_args = [a.detach().double().requires_grad_() for a in grad_args]
        expect = ref(*ref_args, *const_args)
        assert out.shape == expect.shape, name
        torch.testing.assert_close(out.double(), expect, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        out.backward(dout.to(device=device, dtype=out.dtype))
        expect.backward(dout.to(device))
        for a, ra in zip(args, ref_args):
            torch.testing.assert_close(a.grad.double(), ra.grad, atol=atol, rtol=rtol,
                                       msg=lambda m: f"{name} gradient: {m}")


def test_eager_ops_match_fp64_references_on_cpu():
    _check("cpu", torch.float32, atol=1e-5, rtol=1e-5)


def test_cpu_tensors_stay_eager_even_when_enabled(monkeypatch):
    monkeypatch.setattr(fused, "_enabled", True)

    def no_compile(*a, **k):
        raise AssertionError("torch.compile called for a CPU tensor")

    monkeypatch.setattr(torch, "compile", no_compile)
    x = torch.randn(4, 8)
    assert torch.equal(fused.rms_norm(x, torch.ones(8), 1e-5), fused.rms_norm.eager(x, torch.ones(8), 1e-5))


@pytest.mark.gpu
@cuda
def test_compiled_ops_match_fp64_references_on_cuda(monkeypatch):
    monkeypatch.setattr(fused, "_enabled", True)
    _check("cuda", torch.float32, atol=1e-5, rtol=1e-5)
    # bf16 inputs, the autocast case: the ops compute in fp32 and round once at the end
    _check("cuda", torch.bfloat16, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@cuda
def test_small_model_step_compiled_as_accurate_as_eager():
    """One `small`-model step (forward + backward) under bf16 autocast with the ops compiled and with
    them eager, each against the same step in fp32 (the reference): the compiled step may round
    differently from the eager one, but must be no further from fp32 than the eager step is."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from model_helpers import IMG_PATCH, build_batch

    from model.presets import get_preset
    from model.transformer import MultimodalTransformer

    T = 4096

    def step(compile_ops: bool, bf16: bool):
        cfg = get_preset("small")
        cfg.compile_ops = compile_ops
        if not bf16:
            cfg.moe.dispatch = "bmm"  # torch._grouped_mm is bf16-only; the same math (test_gpu.py)
        torch.manual_seed(0)
        model = MultimodalTransformer(cfg, IMG_PATCH).cuda()
        assert fused.enabled() is compile_ops
        batch = build_batch(cfg, [[3000, 1096]], T, images_per_row=[1]).to("cuda")
        w = model.loss_weights()
        torch.manual_seed(1)  # the sampled KL draws the same tokens in every run
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = model(batch)
        sum(w[k] * v for k, v in out.losses.items()).backward()
        losses = {k: float(v.detach()) for k, v in out.losses.items()}
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        return losses, grads

    try:
        ref_l, ref_g = step(False, bf16=False)
        eag_l, eag_g = step(False, bf16=True)
        cmp_l, cmp_g = step(True, bf16=True)
    finally:
        fused.set_enabled(True)
    assert ref_l.keys() == eag_l.keys() == cmp_l.keys() and ref_g.keys() == eag_g.keys() == cmp_g.keys()

    def rel(g, n):
        return float((g[n] - ref_g[n]).norm() / ref_g[n].norm().clamp(min=1e-12))

    for k in ref_l:
        e_eager, e_comp = abs(eag_l[k] - ref_l[k]), abs(cmp_l[k] - ref_l[k])
        assert e_comp <= 1.5 * e_eager + 1e-3 * max(1.0, abs(ref_l[k])), (k, ref_l[k], eag_l[k], cmp_l[k])
    flat = lambda g: torch.cat([g[n].flatten() for n in sorted(ref_g)])  # noqa: E731
    ref_all = flat(ref_g)
    err_eager = float((flat(eag_g) - ref_all).norm() / ref_all.norm())
    err_comp = float((flat(cmp_g) - ref_all).norm() / ref_all.norm())
    assert err_comp <= 1.2 * err_eager + 1e-3, (err_comp, err_eager)
    worse = {n: (rel(cmp_g, n), rel(eag_g, n)) for n in ref_g if rel(cmp_g, n) > 2 * rel(eag_g, n) + 5e-3}
    assert not worse, worse
