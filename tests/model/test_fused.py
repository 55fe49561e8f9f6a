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


def _cases(device, dtype):
    g = torch.Generator().manual_seed(0)

    def r(*s, lo=None):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    B, T, H, D, F_ = 2, 37, 3, 16, 6  # partial RoPE: 12 of 16 dims rotated
    ang = torch.rand(B, T, F_, generator=g) * 2 * math.pi
    N, K, E = 29, 4, 24
    w = torch.rand(N, K, generator=g)
    return {
        "rms_norm": (fused.rms_norm, _ref_rms_norm, (r(B, T, E), (1 + 0.1 * torch.randn(E, generator=g)).to(device)),
                     (1e-5,)),
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
def test_small_model_step_compiled_equals_eager():
    import sys
    import os

    sys.path.insert(0, os.path.dirname(__file__))
    from model_helpers import IMG_PATCH, build_batch

    from model.presets import get_preset
    from model.transformer import MultimodalTransformer

    T = 4096
    res = {}
    for flag in (False, True):
        cfg = get_preset("small")
        cfg.compile_ops = flag
        torch.manual_seed(0)
        model = MultimodalTransformer(cfg, IMG_PATCH).cuda()
        assert fused.enabled() is flag
        batch = build_batch(cfg, [[3000, 1096]], T, images_per_row=[1]).to("cuda")
        w = model.loss_weights()
        torch.manual_seed(1)  # the sampled KL draws the same tokens
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch)
        sum(w[k] * v for k, v in out.losses.items()).backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        res[flag] = ({k: float(v) for k, v in out.losses.items()}, grads)
    (loss_e, g_e), (loss_c, g_c) = res[False], res[True]
    assert loss_e.keys() == loss_c.keys() and g_e.keys() == g_c.keys()
    for k in loss_e:
        assert loss_c[k] == pytest.approx(loss_e[k], rel=2e-3, abs=1e-4), k
    for n in g_e:  # bf16 activations: compare each gradient by its relative norm error
        err = (g_c[n] - g_e[n]).norm() / g_e[n].norm().clamp(min=1e-12)
        assert err < 2e-2, (n, float(err))
    fused.set_enabled(True)
