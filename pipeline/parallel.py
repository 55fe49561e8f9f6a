"""Data parallelism applied from outside the model: DDP, or FSDP2 (`fully_shard`) for the larger
presets — and the state dicts that work for both (full, unsharded, gathered on rank 0).

    ray.parallel = "ddp"    every worker holds the whole model; gradients all-reduced (gloo / NCCL)
    ray.parallel = "fsdp"   parameters, gradients and optimizer state sharded over the workers; each
                            transformer block is one FSDP unit, so one block's weights are gathered at a time
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

if TYPE_CHECKING:
    from pipeline.config import RayConfig

_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Every rank reads the checkpoint itself and passes the full state: FSDP2 keeps its own shard of it,
# DDP the whole. (`broadcast_from_rank0` would spare the other ranks the read, but it only works for
# DTensor parameters: a DDP module refuses the broadcast state dict's keys.)
_LOAD = StateDictOptions(full_state_dict=True)


def wrap(model: torch.nn.Module, ray_cfg: RayConfig, device: torch.device) -> torch.nn.Module:
    """The model wrapped for `ray_cfg.parallel` (DDP with the config's bucket size and all-reduce
    dtype, or FSDP2); one worker's DDP is the model itself (Ray Train does not wrap it)."""
    if ray_cfg.parallel == "ddp":
        import ray.train.torch

        ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_options(ray_cfg))
        if ray_cfg.ddp_grad_dtype == "bf16" and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

            ddp.register_comm_hook(None, bf16_compress_hook)
        return ddp
    model.to(device)
    return shard(model, ray_cfg)


def ddp_options(ray_cfg: RayConfig) -> dict:
    """DDP's settings from the config (what `prepare_model` passes to DistributedDataParallel)."""
    # the gradients are views into DDP's buckets: no copy of every gradient into its bucket and back
    # at each step (3 GB each way for the `small` preset's fp32 gradients)
    # and no broadcast of the buffers at every forward: the model's are constants (the patch
    # encoder's normalisation), equal on every rank from the start
    return {"bucket_cap_mb": ray_cfg.ddp_bucket_mb, "gradient_as_bucket_view": True, "broadcast_buffers": False}


def shard(model: torch.nn.Module, ray_cfg: RayConfig) -> torch.nn.Module:
    """FSDP2: each run of `ray.fsdp_unit_blocks` transformer blocks one unit, the rest the root; the
    config's resharding, prefetch (in units) and gather dtype (`ray.fsdp_param_dtype`: bf16 is
    FSDP2's mixed precision, fp32 reductions)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16: the weights only; a block's inputs keep their dtype (the fp32 residual stream and the
    # RoPE tables: FSDP2 would otherwise cast every floating input of a unit to param_dtype)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
          if ray_cfg.fsdp_param_dtype == "bf16" else MixedPrecisionPolicy())
    blocks, per = list(model.blocks), ray_cfg.fsdp_unit_blocks
    units = [blocks[i:i + per] for i in range(0, len(blocks), per)]
    for unit in units:  # (a list: its blocks' weights gathered and reduced together)
        fully_shard(unit if len(unit) > 1 else unit[0], reshard_after_forward=ray_cfg.fsdp_reshard_after_forward,
                    mp_policy=mp)
    fully_shard(model, mp_policy=mp)  # the embeddings, the patch encoder and the head: the root unit
    # a unit's blocks share its FSDP state: its first block stands for it in the prefetch lists
    heads, n = [unit[0] for unit in units], ray_cfg.fsdp_prefetch
    for i, head in enumerate(heads):
        if n and i + 1 < len(heads):
            head.set_modules_to_forward_prefetch(heads[i + 1:i + 1 + n])
        if n and i > 0:
            head.set_modules_to_backward_prefetch(heads[max(0, i - n):i][::-1])
    return model


def model_state(model: torch.nn.Module) -> dict:
    """Full state dict on rank 0 (empty elsewhere). A collective under FSDP: call it on every rank."""
    return get_model_state_dict(model, options=_SAVE)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=_SAVE)


def load_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a full checkpoint (every rank's own copy) into the wrapped model and its optimizer."""
    set_model_state_dict(model, saved["model"], options=_LOAD)
    set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=_LOAD)
