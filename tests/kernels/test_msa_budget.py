"""Adaptive selection budgets (kernels/select/budget.py): the Triton selection with each budget
against the definitions (checked on the fp32 pooled scores) and against the fp32 reference, and the
chain the model runs (select -> attention -> KL, gradients included) against the fp32 references.

Run: `pytest -q tests/kernels/test_msa_budget.py` (CPU: Triton interpreter).
"""
import math

import pytest
import torch

import kernels
from kernels import Budget
from kernels.attention.reference import msa_attention_reference
from kernels.kl.reference import msa_kl_loss_reference
from kernels.select import reference as ref
from msa_numerics import assert_close, attention_lowp, kl_lowp, rand, support_BHTT

# (B, T, H, dI, block, k_max, cu_seqlens): T not a multiple of the block, packed sequences with one
# shorter than a block and one of a single token, H = 3, tokens with fewer visible blocks than k_max.
CASES = {
    "packed": (1, 130, 2, 32, 16, 5, [0, 7, 50, 51, 130]),
    "batch2": (2, 100, 2, 32, 16, 4, None),
    "H3_k6": (1, 150, 3, 32, 16, 6, None),
}
BUDGETS = {
    "ratio_0.3_min2": Budget("ratio", k_min=2, ratio=0.3),
    "ratio_0.6": Budget("ratio", k_min=1, ratio=0.6),
    "top_p_0.5": Budget("top_p", k_min=1, p=0.5),
    "top_p_0.9_min2": Budget("top_p", k_min=2, p=0.9),
}
EPS = 1e-4  # probability mass within this of p may fall either way (fp32 scores against fp64 sums)


def _inputs(case, device, dtype=torch.float32, scale=3.0):
    B, T, H, I, BS, K, cu = case
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    # scaled so that the block probabilities are neither uniform nor one-hot
    qi = (scale * torch.randn(B, T, H, I, device=device)).to(dtype)
    ki = rand(B, T, I, dtype=dtype, device=device)
    return qi, ki, BS, K, cu_t


def check_budget(bidx, qi, ki, block_size, k_max, cu, budget):
    """Every (token, head) of `bidx` keeps the count its budget asks for, the best-scoring blocks,
    in the contract's layout. Checked on the fp32 pooled scores, in fp64."""
    for b, s0, e0, pooled_HLM in ref.pooled_scores_reference(qi.float(), ki.float(), block_size, cu):
        L = e0 - s0
        sel_LHK = bidx[b, s0:e0].long()
        H, M = pooled_HLM.shape[0], pooled_HLM.shape[-1]
        local_L = torch.arange(L) // block_size
        visible_L = local_L + 1
        n_LH = (sel_LHK >= 0).sum(-1)
        slot_K = torch.arange(k_max)
        # layout: a prefix of valid slots, the local block last among them
        assert ((sel_LHK >= 0) == (slot_K < n_LH[..., None])).all(), "valid slots are not a prefix"
        assert (sel_LHK.gather(-1, (n_LH - 1)[..., None]).squeeze(-1) == local_L[:, None]).all()
        others_LHK = torch.where(slot_K < (n_LH - 1)[..., None], sel_LHK, -1)
        assert ((others_LHK < local_L[:, None, None])).all(), "selected a non-visible or the local block"
        srt = others_LHK.sort(-1).values
        assert not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any(), "duplicate block"
        # count bounds
        cap_L = torch.clamp(visible_L, max=k_max)
        assert (n_LH <= cap_L[:, None]).all() and (n_LH >= torch.clamp(visible_L, max=budget.k_min)[:, None]).all()
        scores_LHM = pooled_HLM.permute(1, 0, 2).double()
        chosen_LHM = torch.zeros(L, H, M + 1, dtype=torch.bool).scatter_(
            -1, torch.where(others_LHK >= 0, others_LHK, M), True)[..., :M]
        visible_other = torch.arange(M)[None, None, :] < local_L[:, None, None]
        worst_in = torch.where(chosen_LHM, scores_LHM, float("inf")).amin(-1)
        best_out = torch.where(visible_other & ~chosen_LHM, scores_LHM, float("-inf")).amax(-1)
        tol = 1e-5 * scores_LHM[torch.isfinite(scores_LHM)].abs().max()
        assert (worst_in >= best_out - tol).all(), "a better block was left out"
        if budget.kind == "ratio":
            want = torch.tensor([min(v, max(budget.k_min, min(k_max, math.ceil(budget.ratio * v))))
                                 for v in visible_L.tolist()])
            assert (n_LH == want[:, None]).all(), "ratio count differs from clamp(ceil(ratio * visible))"
        else:
            prob_LHM = torch.softmax(scores_LHM, -1)  # -inf (invisible) blocks get 0
            is_loc_LM = torch.arange(M)[None, :] == local_L[:, None]
            mass_LH = (prob_LHM * (chosen_LHM | is_loc_LM[:, None, :])).sum(-1)
            weakest_LH = torch.where(chosen_LHM, prob_LHM, float("inf")).amin(-1)
            free_LH = (n_LH < cap_L[:, None])  # could have taken one more block
            assert (~free_LH | (mass_LH >= budget.p - EPS)).all(), "stopped short of p"
            # minimal: without its weakest other block the set would be short of p (unless at k_min)
            above_min = (n_LH > budget.k_min) & (n_LH > 1)
            assert (~above_min | (mass_LH - weakest_LH < budget.p + EPS)).all(), "kept more blocks than p needs"


@pytest.mark.parametrize("budget", list(BUDGETS), ids=list(BUDGETS))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_selection_meets_the_budget_and_matches_reference(case, budget, device):
    bud = BUDGETS[budget]
    qi, ki, BS, K, cu_t = _inputs(CASES[case], device)
    bidx, lse = kernels.msa_select(qi, ki, BS, K, cu_seqlens=cu_t, budget=bud)
    assert bidx.dtype == torch.int32 and bidx.shape == (*qi.shape[:3], K)
    cu = None if cu_t is None else cu_t.cpu()
    check_budget(bidx.cpu(), qi.cpu(), ki.cpu(), BS, K, cu, bud)
    rb, _ = ref.msa_select_reference(qi.cpu(), ki.cpu(), BS, K, cu, budget=bud)
    check_budget(rb, qi.cpu(), ki.cpu(), BS, K, cu, bud)  # the reference keeps the definitions too
    same = (bidx.cpu().sort(-1).values == rb.sort(-1).values).all(-1).float().mean().item()
    assert same > 0.99, f"only {same:.3f} of the selections equal the reference's"
    # index_lse over the kernel's own (trimmed) selection
    rlse = ref.index_lse_reference(qi, ki, bidx, BS, cu_t)
    assert_close("index_lse", lse, rlse, rlse, torch.float32)


def test_adaptive_counts_vary_and_grow_with_their_parameter(device):
    qi, ki, BS, K, cu_t = _inputs((1, 200, 2, 32, 16, 8, None), device)

    def counts(bud):
        return (kernels.msa_select(qi, ki, BS, K, budget=bud)[0] >= 0).sum(-1)

    lo, hi = counts(Budget("top_p", p=0.5)), counts(Budget("top_p", p=0.9))
    assert (lo <= hi).all() and (lo < hi).any()
    assert len(torch.unique(hi[0, 150:])) > 1, "top_p chose one count for every late token"
    r_lo, r_hi = counts(Budget("ratio", ratio=0.2)), counts(Budget("ratio", ratio=0.5))
    assert (r_lo <= r_hi).all() and (r_lo < r_hi).any()


def test_full_ratio_is_the_static_selection(device):
    """ratio = 1 asks for every visible block: capped at k_max, that is static top-k."""
    qi, ki, BS, K, cu_t = _inputs(CASES["packed"], device)
    b_static, l_static = kernels.msa_select(qi, ki, BS, K, cu_seqlens=cu_t)
    b_ratio, l_ratio = kernels.msa_select(qi, ki, BS, K, cu_seqlens=cu_t, budget=Budget("ratio", ratio=1.0))
    assert torch.equal(b_static.sort(-1).values, b_ratio.sort(-1).values)
    torch.testing.assert_close(l_static, l_ratio)


@pytest.mark.parametrize("budget", list(BUDGETS), ids=list(BUDGETS))
def test_model_chain_matches_references(budget, device):
    """What an MSA layer runs: select with the budget, attention over it, the KL over it (with the
    attention's LSE and the selection's index_lse), outputs and gradients against fp32 references."""
    B, T, H, I, BS, K, cu = CASES["packed"]
    Hq, D = 4 * H, 32
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    dtype = torch.float32
    q = rand(B, T, Hq, D, dtype=dtype, device=device, requires_grad=True)
    k = rand(B, T, H, D, dtype=dtype, device=device, requires_grad=True)
    v = rand(B, T, H, D, dtype=dtype, device=device, requires_grad=True)
    qi = (3 * torch.randn(B, T, H, I, device=device)).requires_grad_(True)
    ki = rand(B, T, I, dtype=dtype, device=device, requires_grad=True)
    bidx, index_lse = kernels.msa_select(qi.detach(), ki.detach(), BS, K, cu_seqlens=cu_t, budget=BUDGETS[budget])
    o, lse = kernels.msa_attention(q, k, v, bidx, BS, cu_seqlens=cu_t)
    kl = kernels.msa_kl_loss(q.detach(), k.detach(), qi, ki, bidx, BS, cu_seqlens=cu_t, lse=lse.detach(),
                             index_lse=index_lse)
    do = torch.randn_like(o)
    g_attn = torch.autograd.grad(o, [q, k, v], do)
    g_kl = torch.autograd.grad(kl, [qi, ki])

    allowed = support_BHTT(bidx, B, T, H, BS, cu_t, device)
    ro, rlse = msa_attention_reference(q, k, v, bidx, BS, cu_t)
    lo, llse = attention_lowp(q, k, v, allowed, 1 / math.sqrt(D), dtype)
    assert_close("o", o, ro, lo, dtype)
    assert_close("lse", lse, rlse, llse, dtype)
    for name, g, rg, lg in zip(("dq", "dk", "dv"), g_attn, torch.autograd.grad(ro, [q, k, v], do),
                               torch.autograd.grad(lo, [q, k, v], do)):
        assert_close(name, g, rg, lg, dtype)
    rkl = msa_kl_loss_reference(q.detach(), k.detach(), qi, ki, bidx, BS, cu_t, lse=rlse.detach())
    lkl = kl_lowp(q.detach(), k.detach(), qi, ki, allowed, rlse.detach(), 1 / math.sqrt(D), dtype)
    assert_close("kl", kl, rkl, lkl, dtype)
    for name, g, rg, lg in zip(("dqi", "dki"), g_kl, torch.autograd.grad(rkl, [qi, ki]),
                               torch.autograd.grad(lkl, [qi, ki])):
        assert_close(name, g, rg, lg, dtype)


@pytest.mark.parametrize("budget, match", [
    (Budget("topk"), "budget.kind"),
    (Budget("ratio", k_min=0), "budget.k_min"),
    (Budget("ratio", k_min=6), "budget.k_min"),
    (Budget("ratio", ratio=0.0), "budget.ratio"),
    (Budget("top_p", p=1.5), "budget.p"),
])
def test_budget_errors_name_the_field(budget, match):
    with pytest.raises(ValueError, match=match):
        kernels.msa_select(torch.randn(1, 64, 2, 16), torch.randn(1, 64, 16), 16, 4, budget=budget)
