"""The MoE feed-forward matches a per-token loop reference; its balance loss and loads are right.

    pytest -q tests/model/test_moe.py
"""
import pytest
import torch
import torch.nn.functional as F

from model.config import MoEConfig
from model.moe import MoE


def _loop_reference(moe: MoE, x_NE: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the obviously correct MoE."""
    out = []
    for n in range(x_NE.shape[0]):
        x = x_NE[n]
        probs = F.softmax(x @ moe.router.weight.T, dim=-1)
        w, idx = probs.topk(moe.cfg.top_k)
        w = w / w.sum()
        y = sum(w[j] * moe.experts.expert(int(idx[j]), x) for j in range(moe.cfg.top_k))
        if moe.shared is not None:
            y = y + moe.shared(x)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("n_shared", [1, 0])
def test_matches_per_token_loop(n_shared):
    d = 32
    moe = MoE(d, MoEConfig(n_experts=6, top_k=2, expert_hidden=24, n_shared_experts=n_shared))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 17, d, requires_grad=True)
    y, _ = moe(x, torch.ones(3 * 17, dtype=torch.bool))
    x_ref = x.detach().clone().requires_grad_()
    y_ref = _loop_reference(moe, x_ref.view(-1, d)).view_as(y)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *moe.parameters()], g)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *moe.parameters()], g, allow_unused=True)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, atol=1e-5, rtol=1e-5)


def test_every_expert_in_the_graph_even_without_tokens():
    # DDP needs a gradient (zero is fine) for every parameter on every rank
    d = 16
    moe = MoE(d, MoEConfig(n_experts=8, top_k=1, expert_hidden=8))
    x = torch.randn(1, 2, d)  # 2 tokens, 8 experts: most get nothing
    y, extras = moe(x, torch.ones(2, dtype=torch.bool))
    (y.sum() + extras["aux"]).backward()
    assert all(p.grad is not None for p in moe.parameters())
    assert int((extras["load"] > 0).sum()) <= 2


def test_balance_loss_and_loads():
    d, X, K = 16, 4, 2
    moe = MoE(d, MoEConfig(n_experts=X, top_k=K, expert_hidden=8))
    x = torch.randn(2, 10, d)
    valid = torch.ones(20, dtype=torch.bool)
    valid[15:] = False  # padding
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform router: P_x = 1/X, so aux = sum_x f_x = 1 whatever the routing
    y, ex = moe(x, valid)
    torch.testing.assert_close(ex["aux"], torch.tensor(1.0))
    assert ex["load"].sum() == 15 * K  # only real tokens are counted
    # a router that sends everything to one expert with certainty: aux -> X
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 100 * x.reshape(-1, d).mean(0) / x.reshape(-1, d).mean(0).norm() ** 2
    _, ex = moe(x.mean(1, keepdim=True).expand(2, 10, d).contiguous(), valid)
    assert ex["aux"] > 0.45 * X


def test_grouped_mm_matches_bmm():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    d = 32
    moe = MoE(d, MoEConfig(n_experts=4, top_k=2, expert_hidden=32)).to(torch.bfloat16)
    x = torch.randn(2, 24, d, dtype=torch.bfloat16)
    valid = torch.ones(48, dtype=torch.bool)
    y_bmm, _ = moe(x, valid)
    moe.cfg.dispatch = "grouped_mm"
    try:
        y_grp, _ = moe(x, valid)
    except (RuntimeError, NotImplementedError) as e:  # CPU support of _grouped_mm varies by torch version
        pytest.skip(f"_grouped_mm unavailable here: {e}")
    torch.testing.assert_close(y_grp.float(), y_bmm.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter")
def test_grouped_mm_forward_and_backward_never_stop_the_host():
    # a sync per MoE layer drains the GPU's queue at every layer (docs/perf/steps_h200.md)
    d = 64
    moe = MoE(d, MoEConfig(n_experts=8, top_k=2, expert_hidden=64, dispatch="grouped_mm")).cuda()
    x = torch.randn(2, 128, d, device="cuda", requires_grad=True)
    valid = torch.ones(256, dtype=torch.bool, device="cuda")
    for check in (False, True):  # the first time compiles the small ops (model/fused.py)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if check else 0)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y, extras = moe(x, valid)
            (y.float().sum() + extras["aux"]).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert x.grad is not None and torch.isfinite(x.grad).all()
