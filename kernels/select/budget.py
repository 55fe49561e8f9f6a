"""Selection budgets: how many key blocks each (token, group) attends to (kernels/select/README.md).

`static` is MSA's fixed top-k. The adaptive budgets choose a count per (token, group) between
`k_min` and `k_max` (= the `topk` slots of `msa_select`):

* `ratio`: a fraction of the visible blocks, `n = clamp(ceil(ratio * visible), k_min, k_max)`;
* `top_p`: the smallest set, local block included, whose index-branch probability mass reaches `p`;
  the mass of a block is the softmax of the max-pooled index scores over the token's visible
  blocks; the set grows from the local block through the other blocks in descending score.

In both, `n` never exceeds the visible blocks. The kept blocks are the best-scoring ones, so an
adaptive selection is the static top-n selection for that token's n: the kernel ranks the top
`k_max - 1` other blocks once, with their pooled scores and key log-sum-exps
(`select_kernel(SCORES=True)`), and `trim` cuts each row to its count. This module is the Triton
path's post-processing (PyTorch on the device, `[N, H, K]` tensors, no host sync); the fp32
reference computes the same sets from the full pooled scores in `reference.py`.

Shape legend: N flat tokens, H index heads, K slots (k_max).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BUDGETS = ("static", "ratio", "top_p")


@dataclass(frozen=True)
class Budget:
    """A selection budget; `k_max` is the `topk` passed with it. Fields that do not apply to `kind` are ignored."""

    kind: str = "static"
    k_min: int = 1  # ratio, top_p: at least this many blocks (fewer only where fewer are visible)
    ratio: float = 0.25  # ratio: the fraction of the visible blocks
    p: float = 0.9  # top_p: the index-branch probability mass to cover

    def check(self, k_max: int) -> None:
        """Raise ValueError naming the field that is out of range for a selection of k_max slots."""
        if self.kind not in BUDGETS:
            raise ValueError(f"budget.kind must be one of {BUDGETS}, got {self.kind!r}")
        if self.kind == "static":
            return
        if not (isinstance(self.k_min, int) and 1 <= self.k_min <= k_max):
            raise ValueError(f"budget.k_min must be an integer in [1, topk={k_max}], got {self.k_min!r}")
        if self.kind == "ratio" and not (isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1):
            raise ValueError(f"budget.ratio must be in (0, 1], got {self.ratio!r}")
        if self.kind == "top_p" and not (isinstance(self.p, (int, float)) and 0 < self.p <= 1):
            raise ValueError(f"budget.p must be in (0, 1], got {self.p!r}")

    @property
    def adaptive(self) -> bool:
        return self.kind != "static"


def ratio_counts(visible: torch.Tensor, k_min: int, k_max: int, ratio: float) -> torch.Tensor:
    """Blocks per token under the `ratio` budget for `visible` blocks (any integer tensor)."""
    n = torch.ceil(visible.double() * ratio).long().clamp(min=k_min, max=k_max)
    return torch.minimum(n, visible.long())


def trim(block_idx_NHK: torch.Tensor, score_NHK: torch.Tensor, slot_lse_NHK: torch.Tensor,
         block_lse_NH: torch.Tensor, budget: Budget) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the kernel's top-k_max selection to the budget's count per (token, head).

    In: the kernel's block_idx (local block in slot n_valid - 1), each slot's pooled score and key
    log-sum-exp (natural units, -inf when empty), and the log-sum-exp of the pooled scores over all
    visible blocks. Out: block_idx in the same contract (the other blocks by descending score, the
    local block in slot n - 1, -1 after) and index_lse over the kept keys."""
    N, H, K = block_idx_NHK.shape
    slot_K = torch.arange(K, device=block_idx_NHK.device)
    n_valid_NH = (block_idx_NHK >= 0).sum(-1)
    loc_slot_NH1 = (n_valid_NH - 1).clamp(min=0)[..., None]
    local_NH = block_idx_NHK.gather(-1, loc_slot_NH1).squeeze(-1).long()
    is_other_NHK = slot_K < loc_slot_NH1
    # the other blocks by descending pooled score; empty slots last
    key_NHK = torch.where(is_other_NHK, score_NHK, float("-inf"))
    order_NHK = key_NHK.argsort(dim=-1, descending=True, stable=True)
    idx_o_NHK = block_idx_NHK.gather(-1, order_NHK)
    lse_o_NHK = slot_lse_NHK.gather(-1, order_NHK)
    n_other_NH = n_valid_NH - 1
    if budget.kind == "ratio":
        n_NH = ratio_counts(local_NH + 1, budget.k_min, K, budget.ratio)
    elif budget.kind == "top_p":
        mass_o_NHK = torch.exp(key_NHK.gather(-1, order_NHK) - block_lse_NH[..., None])
        mass_loc_NH = torch.exp(score_NHK.gather(-1, loc_slot_NH1).squeeze(-1) - block_lse_NH)
        # other block i joins while the mass before it (local + the i better ones) is short of p
        before_NHK = mass_loc_NH[..., None] + torch.cumsum(mass_o_NHK, -1) - mass_o_NHK
        need_NH = ((before_NHK < budget.p) & (slot_K < n_other_NH[..., None])).sum(-1)
        n_NH = torch.minimum((1 + need_NH).clamp(min=budget.k_min, max=K), local_NH + 1)
    else:
        raise ValueError(f"trim needs an adaptive budget, got {budget.kind!r}")
    n_NH = torch.minimum(n_NH, n_valid_NH)  # = the visible blocks when fewer than k_max
    keep_o_NHK = slot_K < (n_NH - 1)[..., None]
    out_NHK = torch.where(keep_o_NHK, idx_o_NHK, -1)
    is_loc_NHK = slot_K == (n_NH - 1)[..., None]
    out_NHK = torch.where(is_loc_NHK, local_NH[..., None].to(out_NHK.dtype), out_NHK)
    lse_kept_NHK = torch.where(keep_o_NHK, lse_o_NHK, float("-inf"))
    lse_loc_NH = slot_lse_NHK.gather(-1, loc_slot_NH1).squeeze(-1)
    index_lse_NH = torch.logaddexp(torch.logsumexp(lse_kept_NHK, -1), lse_loc_NH)
    return out_NHK.to(torch.int32), index_lse_NH

