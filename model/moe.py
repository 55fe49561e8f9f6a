"""Mixture-of-experts feed-forward: top-k token-choice routing over routed SwiGLU experts, plus
shared experts every token goes through, and an auxiliary load-balancing loss.

Legend: N tokens (flattened B*T), E d_model, X routed experts, K experts per token, A = N*K
assignments, C per-expert capacity of the padded buffer, F expert hidden width.

Choices (the paper's are not published; the paper gives only "128 routed + 1 shared, top-4"):
  * Router: fp32 softmax over the routed experts, top-k, the k weights renormalised to sum to 1
    (Mixtral / Qwen-MoE). fp32 because bf16 logits tie and flip the top-k between ranks.
  * Balancing: the Switch/GShard auxiliary loss, `X * sum_x f_x * P_x` (f = share of the token's
    k assignments routed to x, P = mean router probability of x, over real tokens; 1.0 when
    perfectly balanced), returned as the loss `moe_aux` with weight `moe.aux_weight`. Chosen over
    bias-based (aux-loss-free) balancing because it keeps the model stateless: its gradient is
    all-reduced by DDP like any other, resume needs no extra state, and no update inside the model
    can differ between ranks. The bias method needs loads synchronised across ranks before each
    bias update, i.e. collective calls in model code. The model therefore needs no hook after the optimizer step.
  * Dropless dispatch, by batched matmuls: assignments are sorted by expert and either
      "bmm": scattered into a [X, C, E] buffer padded to the step's largest expert load, then three
             `torch.bmm`s (any device and dtype; costs one host sync for C and the padding), or
      "grouped_mm": `torch._grouped_mm` over the sorted rows with per-expert offsets (CUDA bf16,
             no padding, no sync).
    Every expert's weights enter the graph even when it got no token, so DDP sees a gradient
    (zero) for all of them. The combine step un-sorts and sums each token's k outputs in a fixed
    order (no atomics): deterministic.

    pytest -q tests/model/test_moe.py
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import fused
from model.config import MoEConfig
from model.layers import SwiGLU


class RoutedExperts(nn.Module):
    """X SwiGLU experts stored as stacked weights in nn.Linear's (out, in) layout."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.w_up = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=0.02)  # the model re-initialises with its own std and depth scaling

    def expert(self, x: int, h: torch.Tensor) -> torch.Tensor:
        """One expert on a few rows (the per-token reference in the tests uses it)."""
        return F.linear(F.silu(F.linear(h, self.w_gate[x])) * F.linear(h, self.w_up[x]), self.w_down[x])

    def forward_bmm(self, h_AE: torch.Tensor, expert_A: torch.Tensor, counts_X: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert -> outputs, through a [X, C, E] buffer padded to the largest load."""
        X = counts_X.numel()
        C = max(1, int(counts_X.max()))  # host sync: the buffer's size
        start_X = torch.cumsum(counts_X, 0) - counts_X
        slot_A = torch.arange(h_AE.shape[0], device=h_AE.device) - start_X[expert_A]
        buf_XCE = h_AE.new_zeros(X, C, h_AE.shape[1])
        buf_XCE[expert_A, slot_A] = h_AE
        g_XCF = torch.bmm(buf_XCE, self.w_gate.transpose(1, 2).to(buf_XCE.dtype))
        u_XCF = torch.bmm(buf_XCE, self.w_up.transpose(1, 2).to(buf_XCE.dtype))
        y_XCE = torch.bmm(fused.silu_mul(g_XCF, u_XCF), self.w_down.transpose(1, 2).to(buf_XCE.dtype))
        return y_XCE[expert_A, slot_A]

    def forward_grouped(self, h_AE: torch.Tensor, counts_X: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert -> outputs, by grouped GEMMs over the jagged per-expert row ranges."""
        dt = h_AE.dtype
        if torch.is_autocast_enabled(h_AE.device.type):
            dt = torch.get_autocast_dtype(h_AE.device.type)  # _grouped_mm is not an autocast op
        offs = torch.cumsum(counts_X, 0).to(torch.int32)
        h = h_AE.to(dt)
        g = torch._grouped_mm(h, self.w_gate.to(dt).transpose(-2, -1), offs=offs)
        u = torch._grouped_mm(h, self.w_up.to(dt).transpose(-2, -1), offs=offs)
        return torch._grouped_mm(fused.silu_mul(g, u), self.w_down.to(dt).transpose(-2, -1), offs=offs)


class MoE(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(d_model, cfg.n_experts, bias=False)
        self.experts = RoutedExperts(cfg.n_experts, d_model, cfg.expert_hidden)
        self.shared = SwiGLU(d_model, cfg.n_shared_experts * cfg.expert_hidden) if cfg.n_shared_experts else None

    def route(self, x_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs [N, X] fp32, expert ids [N, K], weights [N, K] fp32)."""
        with torch.autocast(x_NE.device.type, enabled=False):
            logits_NX = F.linear(x_NE.float(), self.router.weight.float())
        probs_NX = logits_NX.softmax(-1)
        w_NK, idx_NK = probs_NX.topk(self.cfg.top_k, dim=-1)
        return probs_NX, idx_NK, w_NK / w_NK.sum(-1, keepdim=True)

    def forward(self, x_BTE: torch.Tensor, valid_N: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """valid_N (bool [B*T]) marks real tokens: only they count in the balance loss and the loads."""
        shape = x_BTE.shape
        x_NE = x_BTE.reshape(-1, shape[-1])
        N, K, X = x_NE.shape[0], self.cfg.top_k, self.cfg.n_experts
        probs_NX, idx_NK, w_NK = self.route(x_NE)

        # sort the N*K assignments by expert (stable: a token's rows keep their order)
        expert_A = idx_NK.reshape(-1)
        order_A = torch.argsort(expert_A, stable=True)
        expert_sorted_A = expert_A[order_A]
        h_AE = x_NE[order_A // K]
        # rows per expert from the sorted ids; torch.bincount would stop the host on CUDA (it reads its
        # input's max there), once per MoE layer: the GPU then drained its queue at every layer and
        # idled while the host issued the next layer's small launches (docs/perf/steps_h200.md)
        ends_X = torch.searchsorted(expert_sorted_A, torch.arange(1, X + 1, device=expert_A.device))
        counts_X = torch.diff(ends_X, prepend=ends_X.new_zeros(1))
        if self.cfg.dispatch == "grouped_mm":
            y_sorted_AE = self.experts.forward_grouped(h_AE, counts_X)
        else:
            y_sorted_AE = self.experts.forward_bmm(h_AE, expert_sorted_A, counts_X)
        y_AE = torch.empty_like(y_sorted_AE)
        y_AE[order_A] = y_sorted_AE
        y_NE = fused.weighted_sum(y_AE.view(N, K, -1), w_NK).to(x_NE.dtype)
        if self.shared is not None:
            y_NE = y_NE + self.shared(x_NE)

        # balance loss and loads over real tokens only (padding is routed too, but not counted)
        v_N = valid_N.to(probs_NX.dtype)
        n_valid = v_N.sum().clamp(min=1)
        load_X = torch.zeros(X, dtype=probs_NX.dtype, device=x_NE.device)
        load_X.index_add_(0, expert_A, v_N.repeat_interleave(K))
        f_X = load_X / (n_valid * K)
        P_X = (probs_NX * v_N[:, None]).sum(0) / n_valid
        aux = X * (f_X * P_X).sum()
        extras = {"aux": aux, "load": load_X.detach()}
        return y_NE.view(shape), extras
