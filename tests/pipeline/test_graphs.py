"""`train.cuda_graphs`: the training step captured once per batch layout and replayed
(pipeline/graphs.py). On the GPU, steps replayed from graphs over batches of changing layouts
(documents, images, attention modes, learning rates) train the weights as eager steps on the same
batches do, on one GPU and under DDP on two (each rank on its own layouts, the ranks deciding every
step together whether it replays, is captured or runs eagerly); on the CPU, what the configuration
refuses, the learning rate the replays read and the ranks' exchange of layouts.

    pytest -q tests/pipeline/test_graphs.py
"""
from __future__ import annotations

import contextlib
import copy
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from model_helpers import IMG_PATCH, build_batch, leave_worker, small_config  # noqa: E402

from model.transformer import MultimodalTransformer  # noqa: E402
from pipeline.config import ConfigError, RayConfig, TrainConfig, apply_overrides, config_from_dict  # noqa: E402
from pipeline.graphs import DDP_HOST_STEPS, CaptureError, StepGraphs, host_gather, quiet_ddp_timing  # noqa: E402
from pipeline.loop import LoopState, check_bad_steps, record_bad_step, train_step  # noqa: E402
from pipeline.optim import build_optimizer, prepare_for_graphs, set_lr  # noqa: E402
from pipeline.parallel import ddp_options  # noqa: E402


_GRAPHED = ["data.seq_len=128", "model.moe.dispatch='grouped_mm'", "model.msa.backend='triton'",
            "train.cuda_graphs=true", "ray.num_workers=1", "ray.use_gpu=true"]


def _run_config(*overrides: str):
    """The config of a graphed run (tiny, on one GPU) with `--set` overrides on top."""
    data = {"data": {"shards": ["x"]}, "model": {"preset": "tiny"}}
    return config_from_dict(apply_overrides(data, _GRAPHED + list(overrides)))


def test_the_config_takes_cuda_graphs_on_one_gpu_and_says_what_it_cannot_capture():
    assert _run_config().train.cuda_graphs
    assert _run_config("ray.num_workers=2").ray.num_workers == 2  # DDP: its all-reduces captured too
    for overrides, why in [(["ray.use_gpu=false"], "needs a GPU"),
                           (["ray.num_workers=2", "ray.ddp_grad_dtype='bf16'"], "communication hook"),
                           (["ray.parallel='fsdp'"], "FSDP2"),
                           (["model.activation_checkpointing=true"], "activation_checkpointing"),
                           (["model.msa.budget='top_p'"], "adaptive budget"),
                           (["model.moe.dispatch='bmm'"], "MoE dispatch 'bmm'"),
                           (["model.msa.backend='reference'"], "'reference' MSA kernels"),
                           (["train.max_steps=10", "debug.profile_steps=[2, 4]"], "profile_steps")]:
        with pytest.raises(ConfigError, match=f"train.cuda_graphs.*{why}"):
            _run_config(*overrides)


def test_a_capturable_optimizer_reads_its_learning_rate_from_a_tensor_set_in_place():
    model = MultimodalTransformer(small_config(), IMG_PATCH)
    opt = build_optimizer(model, TrainConfig(lr=1e-3, index_lr=2e-3))
    prepare_for_graphs(opt, torch.device("cpu"))
    tensors = [g["lr"] for g in opt.param_groups]
    assert all(torch.is_tensor(t) and g["capturable"] for t, g in zip(tensors, opt.param_groups))
    set_lr(opt, 0.5, frozenset({"backbone"}))
    # the same tensors (a captured step holds their addresses), with this step's values
    assert all(g["lr"] is t for g, t in zip(opt.param_groups, tensors))
    want = {g["group"]: 0.0 if g["group"] == "backbone" else 0.5 * g["lr_scale"] for g in opt.param_groups}
    assert {g["group"]: float(g["lr"]) for g in opt.param_groups} == pytest.approx(want)
    assert want["index"] == pytest.approx(1.0)
    prepare_for_graphs(opt, None)  # back to floats (a checkpoint of a graphed run, restored without)
    assert all(isinstance(g["lr"], float) and not g["capturable"] for g in opt.param_groups)
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25 * opt.param_groups[0]["lr_scale"])


@pytest.mark.parametrize("graphed_again", [False, True])
def test_a_graphed_runs_checkpoint_resumes_with_or_without_graphs(tmp_path, graphed_again):
    """The optimizer state of a graphed run holds its learning rates as tensors: it is written and
    verified like any other, and a resumed run (graphed or not) steps with this step's rate."""
    from pipeline.checkpoint import load_checkpoint, write_checkpoint

    cfg = small_config()
    torch.manual_seed(0)
    model = MultimodalTransformer(cfg, IMG_PATCH)
    batch = build_batch(cfg, [[60, 68], [128]], 128, images_per_row=[1, 1])
    opt = build_optimizer(model, TrainConfig(lr=1e-3))
    prepare_for_graphs(opt, torch.device("cpu"))  # (capturable tensors; the device a CPU here)
    set_lr(opt, 5e-4)
    sum(model(batch).losses.values()).backward()
    opt.step()
    path = write_checkpoint(tmp_path, 1, {"model": model.state_dict(), "optimizer": opt.state_dict()}, {}, {})
    saved, _, _ = load_checkpoint(path)
    resumed = build_optimizer(model, TrainConfig(lr=1e-3))
    resumed.load_state_dict(saved["optimizer"])
    prepare_for_graphs(resumed, torch.device("cpu") if graphed_again else None)
    set_lr(resumed, 2e-4)
    assert all(float(g["lr"]) == pytest.approx(2e-4 * g["lr_scale"]) for g in resumed.param_groups)
    assert all(torch.is_tensor(g["lr"]) == graphed_again == g["capturable"] for g in resumed.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    sum(model(batch).losses.values()).backward()
    resumed.step()
    assert all(int(s["step"]) == 2 for s in resumed.state.values())  # the moments and counts came back
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_graphs_need_a_cuda_device():
    with pytest.raises(ValueError, match="CUDA device"):
        StepGraphs(torch.device("cpu"))


# batches of 2 rows x 256 tokens, 3 image slots per row: one document per row (plain causal mask),
# 3 documents (4 slots) and 5-6 documents (8 slots), with 0-6 images (every slot used in one)
_LAYOUTS = [([[256], [256]], [1, 0]), ([[100, 156], [256]], [2, 1]), ([[60, 60, 136], [200, 56]], [1, 0]),
            ([[256], [256]], [3, 3]), ([[40, 50, 100, 66], [128, 128]], [1, 1])]


STATS_STEP = 13  # sparse, layout 0: a replay but for its statistics


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_replayed_steps_train_as_eager_steps():
    T = 256
    cfg = small_config(msa=dict(block_size=64, topk=2, backend="triton"),
                       moe=dict(dispatch="grouped_mm", expert_hidden=64), max_seq_len=T, dense_impl="flex")
    torch.manual_seed(0)
    base = MultimodalTransformer(cfg, IMG_PATCH).cuda()
    plan = [(mode, i % len(_LAYOUTS)) for mode in ("warmup", "sparse") for i in range(8)]
    lrs = [1e-2 if i % 3 else 0.0 for i in range(len(plan))]  # a baked-in rate would move the zero steps
    host = [build_batch(cfg, docs, T, images_per_row=imgs, seed=i, n_slots=3).with_counts(IMG_PATCH)
            for i, (docs, imgs) in enumerate(_LAYOUTS)]
    results = {}
    for graphed in (False, True):
        model = copy.deepcopy(base)
        opt = build_optimizer(model, TrainConfig(lr=1e-2))
        prepare_for_graphs(opt, torch.device("cuda") if graphed else None)
        graphs = StepGraphs(torch.device("cuda"), say=lambda _: None)
        st, losses = LoopState(), []
        streamed = graphs.streamed() if graphed else contextlib.nullcontext()
        streamed.__enter__()
        for i, ((mode, b), lr) in enumerate(zip(plan, lrs)):
            model.set_mode(mode)
            set_lr(opt, lr)
            stats = i == STATS_STEP  # an eager statistics step between replays, as the loop makes them

            def step(batch):
                return train_step(model, model, batch, opt, torch.autocast("cuda", torch.bfloat16, cache_enabled=False),
                                  stats, 1.0, model.has_index_branch)

            if graphed:
                out, _, _, ok = graphs.run(host[b], None if stats else (mode,), step)
            else:
                out, _, _, ok = step(host[b].to("cuda"))
            record_bad_step(st, ok)
            losses.append(float(out.losses["lm"]))  # read before the next replay overwrites it
        streamed.__exit__(None, None, None)
        check_bad_steps(st, 5)
        results[graphed] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()}, graphs)
    (loss_e, w_e, _), (loss_g, w_g, graphs) = results[False], results[True]
    assert not graphs.refused, graphs.refused
    # a step outside the graphs' stream is refused before anything is captured
    with pytest.raises(CaptureError, match="graphs' stream"):
        graphs._capture(("sparse", 99, False), graphs.static, lambda b: None)
    # per mode 3 keys (2 document slots, one document per row, whatever the images; 4 slots; 8 slots),
    # each eager the first time, captured the second, replayed after: 3 eager, 3 captured, 2 replayed;
    # the statistics step (a sparse replay otherwise) eager
    assert len(graphs.graphs) == 6, graphs.summary()
    assert graphs.counts == {"eager": 7, "captured": 6, "replayed": 3}, graphs.summary()
    torch.testing.assert_close(torch.tensor(loss_g), torch.tensor(loss_e), rtol=2e-3, atol=1e-3)
    # the updates compared as a whole per parameter, not element by element: AdamW's sign-like first
    # steps turn a last-bit difference of a tiny gradient (bf16 autocast, atomics in the backward) into
    # a visible one. A replay that read a stale learning rate (the zero-rate steps baked at 1e-2), or
    # skipped the optimizer, or reused stale gradients, is a third or more off.
    for n, p in base.named_parameters():
        eager, graphed = w_e[n] - p.detach(), w_g[n] - p.detach()
        assert eager.norm() > 0, n  # every parameter trained (so the comparison is not of untouched weights)
        assert (graphed - eager).norm() / eager.norm() < 0.05, n


def _gather_worker(rank: int, store_path: str, out_path: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        gather = host_gather(dist.new_group(backend="gloo"))
        torch.save([gather([2 + 6 * rank, rank]), gather([7])], f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()
    leave_worker()


def test_the_ranks_swap_their_layouts_on_the_host(tmp_path):
    """What the ranks agree on each step under DDP: every rank's few ints, on every rank, in rank order."""
    mp.spawn(_gather_worker, args=(str(tmp_path / "store"), str(tmp_path / "got")), nprocs=2, join=True)
    for r in range(2):
        assert torch.load(f"{tmp_path / 'got'}.{r}") == [[[2, 0], [8, 1]], [[7], [7]]]


STATS_STEP_DDP = 20


def _ddp_worker(rank: int, store_path: str, out_path: str) -> None:
    """One rank: the same 28 steps eagerly and then graphed, each under DDP (fp32 all-reduce, buckets
    as the pipeline sets them); rank r takes layout (i + 3r) % 5 at step i, so the ranks' layouts differ
    (and at every fifth step both hold one document per row)."""
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", store=dist.FileStore(store_path, 2), rank=rank, world_size=2, device_id=dev)
    gloo = dist.new_group(backend="gloo")  # the ranks' layouts agreed on the host, as the loop does
    try:
        T = 256
        cfg = small_config(msa=dict(block_size=64, topk=2, backend="triton"),
                           moe=dict(dispatch="grouped_mm", expert_hidden=64), max_seq_len=T, dense_impl="flex")
        torch.manual_seed(0)
        base = MultimodalTransformer(cfg, IMG_PATCH).to(dev)
        plan = [("warmup", i) for i in range(14)] + [("sparse", i) for i in range(14, 28)]
        host = [build_batch(cfg, docs, T, images_per_row=imgs, seed=i, n_slots=3).with_counts(IMG_PATCH)
                for i, (docs, imgs) in enumerate(_LAYOUTS)]
        out, alive = {}, []
        for graphed in (False, True):
            graphs = StepGraphs(dev, say=lambda _: None, min_host_steps=DDP_HOST_STEPS, gather=host_gather(gloo))
            alive.append(graphs)
            streamed = graphs.streamed() if graphed else contextlib.nullcontext()
            streamed.__enter__()  # DDP built on the stream it runs on, as the loop does
            raw = copy.deepcopy(base)
            model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[rank], **ddp_options(RayConfig()))
            quiet_ddp_timing(model)
            opt = build_optimizer(raw, TrainConfig(lr=1e-2))
            prepare_for_graphs(opt, dev if graphed else None)
            st, losses = LoopState(), []
            for step_i, (mode, i) in enumerate(plan):
                raw.set_mode(mode)
                set_lr(opt, 1e-2 if step_i % 3 else 0.0)
                stats = step_i == STATS_STEP_DDP  # an eager statistics step between replays

                def step(batch):
                    return train_step(model, raw, batch, opt, torch.autocast("cuda", torch.bfloat16, cache_enabled=False),
                                      stats, 1.0, raw.has_index_branch)

                b = host[(i + 3 * rank) % len(_LAYOUTS)]
                if graphed:
                    res, _, _, ok = graphs.run(b, None if stats else (mode,), step)
                else:
                    # the eager reference takes the decision the graphed ranks agree on (the most
                    # document slots; the document mask unless both ranks' rows are one document
                    # each), worked out here from the two ranks' layouts: the same arithmetic, so the
                    # comparison is of the graphs alone (the document mask equals plain causal
                    # attention only up to bf16 rounding, which 28 steps at lr 1e-2 amplify)
                    both = [host[(i + 3 * r) % len(_LAYOUTS)].fixed_shapes() for r in range(2)]
                    one_doc = all(f.n_docs == f.tokens_BT.shape[0] for f in both)
                    agreed = b if stats else b.fixed_shapes(doc_slots=max(f.doc_slots for f in both),
                                                            document_mask=not one_doc)
                    res, _, _, ok = step(agreed.to(dev))
                record_bad_step(st, ok)
                losses.append(float(res.losses["lm"]))
            streamed.__exit__(None, None, None)
            check_bad_steps(st, 5)
            out[graphed] = {"losses": losses, "counts": dict(graphs.counts), "refused": len(graphs.refused),
                            "keys": [list(map(str, k)) for k in graphs.graphs],
                            "params": {n: p.detach().cpu().clone() for n, p in raw.named_parameters()}}
            graphs.release()  # before the process group goes (NCCL waits for graphs holding its collectives)
        torch.save({"out": out, "init": {n: p.detach().cpu() for n, p in base.named_parameters()}},
                   f"{out_path}.{rank}")
    finally:
        for g in alive:  # (a failure: live graphs would keep the process group from being destroyed)
            g.release(wait=False)
        dist.destroy_process_group()
    leave_worker()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP under CUDA graphs needs two GPUs (NCCL)")
def test_ddp_replayed_steps_train_as_eager_ddp_steps(tmp_path):
    out = tmp_path / "ranks"
    ctx = mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + 900
    while not ctx.join(timeout=5):  # a hang (a collective the ranks do not pair) fails the test, not the run
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two DDP ranks did not finish within 15 minutes")
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    # the ranks took every decision together: the same global keys, captured in the same order.
    # Keys per mode: (most slots, every row one document): (2, True) at i % 5 == 0, (4, False) at
    # i % 5 == 3, (8, False) else. Steps 0-10 eager (DDP's 11 host steps); warm-up 11 captured,
    # 12 replayed, 13 captured; sparse 14 and 15 eager (first seen), 16 captured, 17 replayed, 18
    # eager, 19 replayed, 20 eager (statistics), 21 22 replayed, 23 25 captured, 24 26 27 replayed
    assert ranks[0]["out"][True]["keys"] == ranks[1]["out"][True]["keys"] == [
        ["warmup", "8", "False"], ["warmup", "4", "False"], ["sparse", "8", "False"], ["sparse", "4", "False"],
        ["sparse", "2", "True"]]
    for r in ranks:
        eager, graphed = r["out"][False], r["out"][True]
        c = graphed["counts"]
        assert graphed["refused"] == 0 and c == {"eager": 15, "captured": 5, "replayed": 8}, c
        torch.testing.assert_close(torch.tensor(graphed["losses"]), torch.tensor(eager["losses"]), rtol=2e-3, atol=1e-3)
        for n, p0 in r["init"].items():
            upd_e, upd_g = eager["params"][n] - p0, graphed["params"][n] - p0
            assert upd_e.norm() > 0, n
            assert (upd_g - upd_e).norm() / upd_e.norm() < 0.05, n  # as on one GPU (above)
    # the all-reduce ran in every replay: both ranks hold the same weights, bit for bit
    for n in ranks[0]["init"]:
        assert torch.equal(ranks[0]["out"][True]["params"][n], ranks[1]["out"][True]["params"][n]), n
