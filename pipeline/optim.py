"""AdamW over the model's parameter groups (backbone, routed experts, index branch), with decoupled
weight decay on matrices only, and a linear warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch

from pipeline.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """One AdamW; each of the model's groups split into decayed (matrices) and not decayed (norms,
    biases, position tables) parameters. Groups carry `group` (backbone/experts/index) and `lr_scale`."""
    scale = {"backbone": 1.0, "experts": cfg.expert_lr_scale,
             "index": (cfg.index_lr / cfg.lr) if cfg.index_lr else 1.0}
    groups = []
    for name, params in model.param_groups().items():
        params = [p for p in params if p.requires_grad]
        for decay in (True, False):
            ps = [p for p in params if (p.dim() >= 2) == decay]
            if ps:
                groups.append({"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "group": name,
                               "lr_scale": scale[name]})
    # fused: one kernel for every parameter (FSDP2's sharded DTensor parameters too), and it takes a
    # device-side "skip this step" flag (`found_inf`), so a non-finite step is dropped without the
    # host reading the gradient norms (pipeline/loop.py: apply_gradients)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, lr: float, frozen: frozenset[str] = frozenset()) -> None:
    for g in opt.param_groups:
        value = 0.0 if g["group"] in frozen else lr * g["lr_scale"]
        if g.get("capturable") and torch.is_tensor(g["lr"]):
            g["lr"].fill_(value)  # a captured step reads it from the device (`prepare_for_graphs`)
        else:
            g["lr"] = value


def prepare_for_graphs(opt: torch.optim.Optimizer, device: torch.device | None) -> None:
    """With a device: the optimizer made capturable in a CUDA graph (pipeline/graphs.py), each group's
    learning rate a tensor on it, which `set_lr` fills in place, so that a replayed step reads this
    step's rate (a float would be baked into the graph). None: plain floats, not capturable (what a
    checkpoint of a graphed run restores to otherwise)."""
    for g in opt.param_groups:
        lr = float(g["lr"])
        g["capturable"] = device is not None
        g["lr"] = torch.tensor(lr, dtype=torch.float32, device=device) if device is not None else lr


def group_params(opt: torch.optim.Optimizer, names: set[str]) -> list[torch.nn.Parameter]:
    return [p for g in opt.param_groups if g["group"] in names for p in g["params"]]
