"""The model trains under DDP (as the pipeline wraps it): every parameter gets a gradient from the
weighted losses in warmup and sparse mode, also when experts get no token and a batch has no image.
One process, gloo, no Ray.

    pytest -q tests/model/test_ddp.py
"""
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model.transformer import MultimodalTransformer
from model_helpers import IMG_PATCH, build_batch, small_config, with_and_without_recompute


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("msa, mode", [(True, "warmup"), (True, "sparse"), (False, "dense")])
def test_trains_under_ddp(process_group, msa, mode):
    cfg = small_config(msa=dict(enabled=msa), moe=dict(n_experts=8, top_k=1))
    model = MultimodalTransformer(cfg, IMG_PATCH)
    model.set_mode(mode)
    ddp = DDP(model)  # find_unused_parameters=False, as ray.train.torch.prepare_model does
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    w = model.loss_weights()
    batches = [build_batch(cfg, [[40, 24]], 64, images_per_row=[1]),
               build_batch(cfg, [[9]], 16),  # no image, 9 tokens for 8 experts: some get none
               build_batch(cfg, [[64]], 64, images_per_row=[2])]
    for batch in batches:
        out = ddp(batch, compute_stats=False)
        loss = sum(w[k] * v for k, v in out.losses.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()


@pytest.mark.parametrize("wrap_kind", ["ddp", "fsdp"])
def test_activation_checkpointing_under_ddp_and_fsdp(process_group, wrap_kind):
    # recomputed blocks inside the wrappers the pipeline applies (pipeline/parallel.py: FSDP2 shards
    # block by block, so a recomputed block gathers its weights again): the gradients are the plain
    # model's, the index branch's (the KL's side output) included
    from torch.distributed.fsdp import fully_shard

    cfg = small_config(msa=dict(kl_sample=0.5))
    batch = build_batch(cfg, [[40, 24]], 64, images_per_row=[1])

    def wrap(model):
        if wrap_kind == "ddp":
            return DDP(model)
        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)

    _, grads = with_and_without_recompute(cfg, batch, "sparse", wrap)
    assert grads[1].keys() == grads[0].keys()
    assert any(".attn.index_" in n for n in grads[0])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
