"""The MSA layer: equals dense attention when top-k covers every block; its KL trains only the
index branch and the LM loss never reaches it; the real kernels are exercised (reference backend,
and the Triton path in the interpreter at small shapes).

    pytest -q tests/model/test_msa.py
"""
import pytest
import torch

from model.msa import MSAAttention
from model.transformer import MultimodalTransformer
from model_helpers import IMG_PATCH, attn_context, build_batch, small_config


def _layer_grads(layer, x, ctx):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    o, _ = layer(x, ctx)
    (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return o.detach(), x.grad, grads


@pytest.mark.parametrize("backend, T, docs", [
    ("reference", 128, [[50, 78], [128]]),
    pytest.param("triton", 64, [[64], [23, 41]], marks=pytest.mark.slow),
])
def test_topk_covering_every_block_equals_dense(backend, T, docs):
    cfg = small_config(msa=dict(block_size=16, topk=T // 16, backend=backend), max_seq_len=T)
    batch = build_batch(cfg, docs, T)
    layer = MSAAttention(cfg)
    x = torch.randn(len(docs), T, cfg.d_model)
    o_dense, dx_dense, g_dense = _layer_grads(layer, x, attn_context(cfg, batch, "dense"))
    o_sparse, dx_sparse, g_sparse = _layer_grads(layer, x, attn_context(cfg, batch, "sparse"))
    torch.testing.assert_close(o_sparse, o_dense, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dx_sparse, dx_dense, atol=2e-5, rtol=1e-4)
    assert set(g_sparse) == set(g_dense) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], atol=2e-5, rtol=1e-4)


def _model(backend="reference", T=128):
    cfg = small_config(msa=dict(backend=backend), max_seq_len=T)
    return cfg, MultimodalTransformer(cfg, IMG_PATCH)


def _check_kl_grads_only_index(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    index = set(model.index_parameter_names())
    assert index, "the model has index parameters"
    for name, p in model.named_parameters():
        if name in index:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no KL gradient"
        else:
            assert p.grad is None, f"the KL reached {name}"


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_kl_gradient_reaches_only_index_branch(mode):
    cfg, model = _model()
    model.set_mode(mode)
    batch = build_batch(cfg, [[40, 88], [128]], 128, images_per_row=[1, 0])
    _check_kl_grads_only_index(model, model(batch).losses["kl_index"])


@pytest.mark.slow
def test_kl_gradient_reaches_only_index_branch_triton():
    cfg, model = _model("triton", T=64)
    batch = build_batch(cfg, [[64], [30, 34]], 64)
    _check_kl_grads_only_index(model, model(batch).losses["kl_index"])


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_lm_and_aux_losses_never_reach_index_branch(mode):
    cfg, model = _model()
    model.set_mode(mode)
    batch = build_batch(cfg, [[40, 88], [128]], 128, images_per_row=[1, 0])
    out = model(batch)
    (out.losses["lm"] + out.losses["moe_aux"]).backward()
    index = set(model.index_parameter_names())
    for name, p in model.named_parameters():
        if name in index:
            assert p.grad is None, f"the LM loss reached {name}"
    assert model.blocks[1].attn.q_proj.weight.grad.abs().sum() > 0


def test_warmup_attends_densely():
    cfg, model = _model()
    batch = build_batch(cfg, [[40, 88], [128]], 128)
    with torch.no_grad():
        model.set_mode("dense")
        dense = model(batch)
        model.set_mode("warmup")
        warm = model(batch)
        model.set_mode("sparse")
        sparse = model(batch)
    assert set(dense.losses) == {"lm", "moe_aux"} and set(warm.losses) == {"lm", "kl_index", "moe_aux"}
    torch.testing.assert_close(warm.losses["lm"], dense.losses["lm"])
    assert warm.stats["sparsity"] == 0.0 and sparse.stats["sparsity"] > 0.1
    assert not torch.allclose(sparse.losses["lm"], dense.losses["lm"])


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_evaluation_can_skip_the_kl_and_gets_the_same_logits(mode):
    cfg = small_config()
    model = MultimodalTransformer(cfg, img_patch_id=IMG_PATCH).eval()
    model.set_mode(mode)
    batch = build_batch(cfg, [[100, 60], [128]], T=160)
    with torch.no_grad():
        full = model(batch, return_logits=True)
        lm_only = model(batch, return_logits=True, index_loss=False)
    assert "kl_index" in full.losses and "kl_index" not in lm_only.losses
    assert torch.equal(full.logits, lm_only.logits)
    assert lm_only.losses["lm"] == full.losses["lm"]


BUDGET_FIELDS = {
    "ratio": dict(budget="ratio", budget_ratio=0.5, budget_k_min=2, topk=6),
    "top_p": dict(budget="top_p", budget_p=0.6, budget_k_min=1, topk=6),
}


@pytest.mark.parametrize("budget", list(BUDGET_FIELDS))
def test_adaptive_budget_trains_only_the_index_branch_by_kl_and_reports_its_blocks(budget):
    cfg = small_config(msa=BUDGET_FIELDS[budget], max_seq_len=128)
    model = MultimodalTransformer(cfg, IMG_PATCH)
    model.set_mode("sparse")
    batch = build_batch(cfg, [[40, 88], [128]], 128, images_per_row=[1, 0])
    out = model(batch, compute_stats=True)
    # the statistics a user judges a budget by, overall and per MSA layer
    bpt = out.stats["blocks_per_token"]
    assert 1.0 <= float(bpt) <= 6.0 and "layer/1/blocks_per_token" in out.stats
    sel = out.selection[1][0]  # [N, Hkv, K] of the first MSA layer
    n_NH = (sel >= 0).sum(-1).float()
    valid_N = batch.segment_ids_BT.flatten() > 0
    torch.testing.assert_close(out.stats["layer/1/blocks_per_token"], n_NH[valid_N].mean())
    if budget == "ratio":  # the count is a function of the position alone: clamp(ceil(0.5 * visible), 2, 6)
        visible_N = batch.positions_BT.flatten() // 16 + 1
        want_N = torch.minimum(torch.clamp(torch.ceil(visible_N * 0.5), 2, 6), visible_N.float())
        assert torch.equal(n_NH[valid_N], want_N[valid_N][:, None].expand(-1, n_NH.shape[1]))
    else:
        assert len(torch.unique(n_NH[valid_N])) > 1, "top_p chose one count everywhere"
    # the model FLOPs count the main branch from what was attended
    assert out.attended_pairs is not None and float(out.attended_pairs) > 0
    _check_kl_grads_only_index(model, out.losses["kl_index"])


# static top-k as the `small` preset runs it: the KL on sampled tokens computing the student's
# log-sum-exp itself (msa.index_lse = "kl"; "select" hands over the selection's, kernels/ tests both)
TRITON_FIELDS = {**BUDGET_FIELDS, "static": dict(topk=4, kl_sample=0.5)}


@pytest.mark.slow
@pytest.mark.parametrize("budget", list(TRITON_FIELDS))
def test_triton_model_matches_reference_backend(budget):
    """The whole model on the Triton kernels (interpreter) against the fp32 reference kernels."""
    outs = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        cfg = small_config(msa={**TRITON_FIELDS[budget], "backend": backend}, max_seq_len=96)
        model = MultimodalTransformer(cfg, IMG_PATCH)
        model.set_mode("sparse")
        batch = build_batch(cfg, [[96], [30, 66]], 96)
        out = model(batch, compute_stats=True)
        (out.losses["lm"] + out.losses["kl_index"]).backward()
        outs[backend] = (out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (ref, g_ref), (tri, g_tri) = outs["reference"], outs["triton"]
    for layer, sel in ref.selection.items():
        assert torch.equal(sel.sort(-1).values, tri.selection[layer].sort(-1).values)
    torch.testing.assert_close(tri.losses["lm"], ref.losses["lm"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tri.losses["kl_index"], ref.losses["kl_index"], atol=1e-5, rtol=1e-4)
    for name in g_ref:
        torch.testing.assert_close(g_tri[name], g_ref[name], atol=1e-5, rtol=1e-4)


def test_budget_param_replaces_the_configs_value_and_static_compute_is_reported():
    cfg = small_config(msa=dict(BUDGET_FIELDS["ratio"], budget_match_topk=3), max_seq_len=128)
    model = MultimodalTransformer(cfg, IMG_PATCH)
    model.set_mode("sparse")
    batch = build_batch(cfg, [[40, 88], [128]], 128)
    visible_N = batch.positions_BT.flatten() // 16 + 1
    valid_N = batch.segment_ids_BT.flatten() > 0
    with torch.no_grad():
        for ratio in (None, 0.25, 1.0):
            model.set_budget_param(ratio)
            out = model(batch, compute_stats=True)
            r = cfg.msa.budget_ratio if ratio is None else ratio
            want_N = torch.minimum(torch.clamp(torch.ceil(visible_N * r), 2, 6), visible_N.float())
            n_NH = (out.selection[1][0] >= 0).sum(-1).float()
            assert torch.equal(n_NH[valid_N], want_N[valid_N][:, None].expand(-1, n_NH.shape[1])), ratio
            # the target of budget_match_topk: what static top-3 selects on the same tokens
            static = torch.clamp(visible_N, max=3).float()[valid_N].mean()
            torch.testing.assert_close(out.stats["blocks_per_token_static"], static)
    with pytest.raises(ValueError, match="ratio"):
        model.set_budget_param(1.5)


@pytest.mark.parametrize("start", [0.99, 0.05])
def test_budget_match_brings_top_p_to_static_compute_on_the_model(start):
    """top_p's counts follow the index branch: the controller finds the p that spends what static
    top-3 spends on the same batch, from either side."""
    from pipeline.schedule import BudgetMatch

    torch.manual_seed(0)
    cfg = small_config(msa=dict(BUDGET_FIELDS["top_p"], budget_match_topk=3), max_seq_len=128)
    model = MultimodalTransformer(cfg, IMG_PATCH)
    model.set_mode("sparse")
    batch = build_batch(cfg, [[40, 88], [128], [100, 28]], 128)
    match = BudgetMatch("top_p", start)
    with torch.no_grad():
        for _ in range(10):
            model.set_budget_param(match.param)
            out = model(batch, index_loss=False)
            measured, target = float(out.stats["blocks_per_token"]), float(out.stats["blocks_per_token_static"])
            match.update(measured, target)
    assert abs(measured / target - 1) < 0.02, (match.param, measured, target)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter")
@pytest.mark.parametrize("kl_sample", [1.0, 0.25])
def test_sparse_layer_forward_and_backward_never_stop_the_host(kl_sample):
    # The step's only syncs are where the model reads the batch's layout (model/attention.py,
    # model/transformer.py); inside a layer one would drain the GPU's queue at every layer.
    T, docs = 512, [[200, 312], [512]]
    cfg = small_config(msa=dict(block_size=64, topk=4, backend="triton", kl_sample=kl_sample), max_seq_len=T)
    batch = build_batch(cfg, docs, T).to("cuda")
    layer = MSAAttention(cfg).cuda()
    x = torch.randn(len(docs), T, cfg.d_model, device="cuda", requires_grad=True)
    for check in (False, True):  # the first time compiles the small ops (model/fused.py)
        ctx = attn_context(cfg, batch, "sparse")  # a new layout (read on the host): its tables are built anew
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if check else 0)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                o, extras = layer(x, ctx)
            (o.float().square().mean() + extras["kl"]).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x.grad).all() and 0 < float(extras["sparsity"]) < 1
