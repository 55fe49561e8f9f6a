"""The whole model: mode switches keep parameters, losses and statistics are named as the pipeline
expects, param groups partition the parameters, and every mode trains.

    pytest -q tests/model/test_transformer.py
"""
import dataclasses
import os

import pytest
import torch

from model.attention import DocLayout
from model.transformer import MultimodalTransformer
from model_helpers import IMG_PATCH, build_batch, small_config, with_and_without_recompute


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_mode_switches_keep_parameters_and_shapes():
    cfg = small_config()
    model = MultimodalTransformer(cfg, IMG_PATCH)
    assert model.mode == "sparse"
    before = _shapes(model)
    batch = build_batch(cfg, [[60, 68], [128]], 128, images_per_row=[1, 1])
    for mode in ("dense", "warmup", "sparse", "warmup", "dense"):
        model.set_mode(mode)
        assert model.mode == mode
        with torch.no_grad():
            model(batch)
        assert _shapes(model) == before
    with pytest.raises(ValueError, match="mode must be one of"):
        model.set_mode("retrofit")


def test_dense_model_refuses_index_modes():
    model = MultimodalTransformer(small_config(msa=dict(enabled=False)), IMG_PATCH)
    assert model.mode == "dense" and not model.index_parameter_names()
    with pytest.raises(ValueError, match="needs an index branch"):
        model.set_mode("warmup")
    model.set_mode("dense")


def test_losses_and_stats_are_named_for_the_pipeline():
    cfg = small_config()
    model = MultimodalTransformer(cfg, IMG_PATCH)
    batch = build_batch(cfg, [[60, 68], [100]], 128, images_per_row=[1, 0])
    with torch.no_grad():
        out = model(batch)
        out_stats = model(batch, compute_stats=True)
    assert set(out.losses) == {"lm", "kl_index", "moe_aux"}
    assert all(v.dim() == 0 for v in out.losses.values())
    assert out.n_targets == batch.n_text_targets > 0
    msa_layers, moe_layers = cfg.msa_layers, cfg.moe_layers
    expected = {"sparsity", "blocks_per_token", "kl_index_loss", "moe_aux_loss", "expert_load_max_over_mean"}
    expected |= {f"layer/{i}/{k}" for i in msa_layers for k in ("sparsity", "blocks_per_token", "kl_index_loss")}
    expected |= {f"layer/{i}/expert_load_max_over_mean" for i in moe_layers}
    assert set(out.stats) == expected
    recall = {"score_recall", "block_recall"} | {f"layer/{i}/{k}" for i in msa_layers
                                                  for k in ("score_recall", "block_recall")}
    assert set(out_stats.stats) == expected | recall
    # 0-dim tensors on the model's device: nothing is read to the host in the forward
    assert all(torch.is_tensor(v) and v.dim() == 0 and v.dtype == torch.float32 for v in out_stats.stats.values())
    assert 0 < out.stats["sparsity"] < 1 and 0 < out_stats.stats["score_recall"] <= 1
    assert out.stats["kl_index_loss"] == pytest.approx(float(out.losses["kl_index"]))

    dense = MultimodalTransformer(small_config(msa=dict(enabled=False), moe=dict(enabled=False)), IMG_PATCH)
    with torch.no_grad():
        out = dense(batch, compute_stats=True)
    assert set(out.losses) == {"lm"} and {k: float(v) for k, v in out.stats.items()} == {"sparsity": 0.0}


def test_param_groups_partition_the_parameters():
    model = MultimodalTransformer(small_config(), IMG_PATCH)
    groups = model.param_groups()
    assert set(groups) == {"backbone", "experts", "index"}
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    named = dict(model.named_parameters())
    assert {id(named[n]) for n in model.index_parameter_names()} == {id(p) for p in groups["index"]}
    assert all(n.split(".")[-1] in ("weight",) for n in model.index_parameter_names())
    assert len(groups["experts"]) == 3 * len(model.cfg.moe_layers)
    w = model.loss_weights()
    assert w == {"lm": 1.0, "kl_index": model.cfg.msa.kl_weight, "moe_aux": model.cfg.moe.aux_weight}


def test_images_are_native_tokens():
    cfg = small_config()
    model = MultimodalTransformer(cfg, IMG_PATCH)
    batch = build_batch(cfg, [[60, 68], [100]], 128, images_per_row=[2, 0])
    out = model(batch)
    out.losses["lm"].backward()
    # the patch encoder is trained with the rest, from the text loss
    assert model.patch_encoder.proj.weight.grad.abs().sum() > 0
    other = build_batch(cfg, [[60, 68], [100]], 128, images_per_row=[2, 0], seed=0)
    other.images_BNCHW = 255 - other.images_BNCHW
    with torch.no_grad():
        assert not torch.allclose(model(other).losses["lm"], out.losses["lm"])
    # no image in the batch: the encoder still gets a (zero) gradient, as DDP needs
    model.zero_grad(set_to_none=True)
    model(build_batch(cfg, [[128]], 128)).losses["lm"].backward()
    assert model.patch_encoder.proj.weight.grad is not None


@pytest.mark.parametrize("mode", ["dense", "warmup", "sparse"])
def test_every_mode_trains(mode):
    cfg = small_config()
    torch.manual_seed(0)
    model = MultimodalTransformer(cfg, IMG_PATCH)
    model.set_mode(mode)
    batch = build_batch(cfg, [[60, 68], [128]], 128, images_per_row=[1, 0])
    groups = model.param_groups()
    opt = torch.optim.AdamW([{"params": groups["backbone"] + groups["experts"], "lr": 3e-3},
                             {"params": groups["index"], "lr": 1e-2}])
    w = model.loss_weights()
    history = []
    for _ in range(6):
        out = model(batch)
        loss = sum(w[k] * v for k, v in out.losses.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in out.losses.items()})
    assert history[-1]["lm"] < history[0]["lm"] - 0.3
    if mode != "dense":
        assert history[-1]["kl_index"] < history[0]["kl_index"]


@pytest.mark.parametrize("mode,backend", [("dense", "reference"), ("warmup", "reference"),
                                          ("sparse", "reference"), ("sparse", "triton")])
def test_activation_checkpointing_keeps_losses_and_every_gradient(mode, backend):
    # the same weights with and without recomputation: the losses, and the gradients of every
    # parameter, the index branch's too (its only gradient is the KL's, a side output of the block),
    # agree; the KL on sampled tokens draws the same tokens in the recomputation
    cfg = small_config(msa=dict(backend=backend, kl_sample=0.5, warmup_kl_sample=0.5))
    batch = build_batch(cfg, [[60, 68], [100]], 128, images_per_row=[1, 0])
    if backend == "triton":  # the interpreter is slow: one MSA layer, one row of two documents
        cfg = dataclasses.replace(cfg, n_layers=2)
        batch = build_batch(cfg, [[40, 24]], 64, images_per_row=[1])
    losses, grads = with_and_without_recompute(cfg, batch, mode)
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert grads[1].keys() == grads[0].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    index = [n for n in grads[0] if ".attn.index_" in n]
    if mode == "dense":
        assert not index
    else:
        assert index and all(grads[1][n].abs().sum() > 0 for n in index)


def test_activation_checkpointing_is_validated():
    with pytest.raises(ValueError, match="model.activation_checkpointing"):
        small_config(activation_checkpointing="yes")


@pytest.mark.parametrize("images_per_row", [[1, 2], [0, 0]])
def test_host_counts_give_the_same_forward_and_gradients(images_per_row):
    """A batch whose documents, images and patch tokens were counted on the host (what the pipeline
    hands the model, so that the forward needs no host sync) trains exactly as one counted on the device."""
    cfg = small_config()
    torch.manual_seed(0)
    model = MultimodalTransformer(cfg, IMG_PATCH)
    batch = build_batch(cfg, [[60, 68], [40, 50, 38]], 128, images_per_row=images_per_row)
    counted = batch.with_counts(IMG_PATCH)
    assert counted.n_docs == DocLayout.from_segments(batch.segment_ids_BT).n_docs == 5
    assert counted.n_images == sum(images_per_row)
    assert counted.n_patch_tokens == sum(images_per_row) * cfg.n_patches
    assert DocLayout.from_segments(batch.segment_ids_BT, counted.n_docs).cu_seqlens.tolist() == \
        DocLayout.from_segments(batch.segment_ids_BT).cu_seqlens.tolist()
    runs = []
    for b in (batch, counted):
        torch.manual_seed(1)  # the sampled KL draws the same tokens
        model.zero_grad(set_to_none=True)
        out = model(b)
        sum(out.losses.values()).backward()
        runs.append(({k: v.detach() for k, v in out.losses.items()},
                     {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grad_a), (loss_b, grad_b) = runs
    assert loss_a.keys() == loss_b.keys() and grad_a.keys() == grad_b.keys()
    for k in loss_a:
        torch.testing.assert_close(loss_b[k], loss_a[k], rtol=0, atol=0)
    for n in grad_a:
        torch.testing.assert_close(grad_b[n], grad_a[n], rtol=1e-6, atol=1e-7, msg=n)
    # the images reached the loss (or, with none, the encoder's weights are in the graph at zero)
    assert (grad_a["patch_encoder.proj.weight"].abs().sum() > 0) == bool(sum(images_per_row))


@pytest.mark.parametrize("backend,mode", [("reference", "sparse"), ("reference", "warmup"), ("triton", "sparse"),
                                          ("triton", "warmup"), ("reference", "dense")])
def test_fixed_shapes_give_the_same_forward_and_gradients(backend, mode):
    """A batch laid out in fixed shapes (what a captured training step replays: every image slot
    through the encoder, the documents padded with empty ones up to a power of two) trains as the
    batch sized by its counts: the same losses and statistics, the same gradients, in every mode and
    with both kernel backends (the empty documents reach every MSA kernel and its backward)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels on CPU tensors run in the interpreter only (a GPU machine: "
                    "tests/pipeline/test_graphs.py runs fixed shapes through them on the GPU)")
    cfg = small_config(msa=dict(backend=backend, block_size=16, topk=3))
    torch.manual_seed(0)
    model = MultimodalTransformer(cfg, IMG_PATCH)
    model.set_mode(mode)
    # 5 documents (8 slots), 3 of the rows' 2 x 2 image slots used
    counted = build_batch(cfg, [[60, 68], [40, 50, 38]], 128, images_per_row=[1, 2]).with_counts(IMG_PATCH)
    fixed = counted.fixed_shapes()
    assert (fixed.doc_slots, fixed.image_slots) == (8, counted.images_BNCHW.shape[0] * counted.images_BNCHW.shape[1])
    assert fixed.image_slots > counted.n_images
    layout = DocLayout.from_segments(fixed.segment_ids_BT, fixed.n_docs, fixed.doc_slots)
    assert layout.cu_seqlens.tolist()[:6] == DocLayout.from_segments(counted.segment_ids_BT).cu_seqlens.tolist()
    assert layout.cu_seqlens.tolist()[6:] == [256] * 3 and not layout.seq_valid_S[5:].any()
    # and padded further, to the slots another rank's batch needs (CUDA graphs under DDP)
    wider = counted.fixed_shapes(doc_slots=16)
    assert wider.doc_slots == 16
    with pytest.raises(ValueError, match="doc_slots=4: this batch needs 8"):
        counted.fixed_shapes(doc_slots=4)
    runs = []
    for b in (counted, fixed, wider):
        torch.manual_seed(1)  # the sampled KL draws the same tokens
        model.zero_grad(set_to_none=True)
        out = model(b, compute_stats=mode != "dense")
        sum(out.losses.values()).backward()
        runs.append(({k: v.detach() for k, v in {**out.losses, **out.stats}.items()},
                     {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (val_a, grad_a), *padded = runs
    for val_b, grad_b in padded:
        assert val_a.keys() == val_b.keys() and grad_a.keys() == grad_b.keys()
        # fp32 to its last bits but for the order of sums (the encoder's convolution sees more images)
        for k in val_a:
            torch.testing.assert_close(val_b[k], val_a[k], rtol=1e-5, atol=1e-7, msg=k)
        for n in grad_a:
            torch.testing.assert_close(grad_b[n], grad_a[n], rtol=1e-5, atol=1e-7, msg=n)
    assert grad_a["patch_encoder.proj.weight"].abs().sum() > 0


def test_a_forced_document_mask_gives_the_causal_result():
    """Batch.document_mask: rows of one document each through the document-mask path (what the
    benchmark's dense-flex and dense-varlen variants time) train as the plain causal path."""
    cfg = small_config()
    torch.manual_seed(0)
    model = MultimodalTransformer(cfg, IMG_PATCH)
    model.set_mode("dense")
    counted = build_batch(cfg, [[128], [128]], 128, images_per_row=[1, 0]).with_counts(IMG_PATCH)
    runs = []
    for b in (counted, dataclasses.replace(counted, document_mask=True)):
        seen = []
        hook = model.blocks[0].attn.register_forward_pre_hook(lambda mod, args: seen.append(args[1].mask.causal_only))
        model.zero_grad(set_to_none=True)
        out = model(b)
        hook.remove()
        out.losses["lm"].backward()
        runs.append((seen[0], out.losses["lm"].detach(), model.blocks[0].attn.q_proj.weight.grad.clone()))
    (causal_a, loss_a, grad_a), (causal_b, loss_b, grad_b) = runs
    assert causal_a and not causal_b  # the two paths were taken
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-6)


def test_fixed_shapes_with_every_image_slot_used_give_the_same_forward():
    """The captured step's placement of the patches is the same whether some image slots are unused
    or none is (every patch then has its token; no surplus goes to the spare row)."""
    cfg = small_config()
    torch.manual_seed(0)
    model = MultimodalTransformer(cfg, IMG_PATCH)
    counted = build_batch(cfg, [[60, 68], [128]], 128, images_per_row=[2, 2]).with_counts(IMG_PATCH)
    fixed = counted.fixed_shapes()
    assert fixed.image_slots == fixed.n_images == 4
    x_a, x_b = model.embed_inputs(counted), model.embed_inputs(fixed)
    torch.testing.assert_close(x_b, x_a, rtol=1e-5, atol=1e-7)


def test_fixed_shapes_need_the_counts_and_enough_slots():
    from model.batch import doc_slots_for

    assert [doc_slots_for(n) for n in (1, 2, 3, 4, 5, 8, 9, 100)] == [1, 2, 4, 4, 8, 8, 16, 128]
    cfg = small_config()
    batch = build_batch(cfg, [[60, 68], [128]], 128, images_per_row=[1, 1])
    with pytest.raises(ValueError, match="counts"):
        batch.fixed_shapes()
    counted = batch.with_counts(IMG_PATCH)
    with pytest.raises(ValueError, match="doc_slots=2 is fewer than the batch's 3 documents"):
        DocLayout.from_segments(counted.segment_ids_BT, counted.n_docs, 2)
    model = MultimodalTransformer(cfg, IMG_PATCH)
    with pytest.raises(ValueError, match="image_slots=1 is fewer than the batch's 2 images"):
        model(dataclasses.replace(counted, image_slots=1))


def test_batch_counts_must_match_the_model_patch_size():
    cfg = small_config()
    model = MultimodalTransformer(cfg, IMG_PATCH)
    batch = build_batch(cfg, [[60, 68], [100]], 128, images_per_row=[1, 0]).with_counts(IMG_PATCH)
    bad = dataclasses.replace(batch, n_patch_tokens=batch.n_patch_tokens - 1)
    with pytest.raises(ValueError, match="image-patch tokens"):
        model(bad)
