"""Retrofitting MSA onto a dense model (the paper's MSA-CPT, the comparison point of docs/msa.md):
load a dense GQA checkpoint into an MSA-configured model of the same shape, with fresh index
projections, ready for the index warm-up and then sparse training.

    names = load_dense_checkpoint(msa_model, torch.load(path)["model"])
    # msa_model is now in "warmup" mode; train the index branch (KL), then set_mode("sparse")

The backbone's parameter names are identical in dense and MSA models (MSAAttention subclasses
GQAAttention), so every tensor of the dense checkpoint must map 1:1, with the same shape, onto the
MSA model; the only parameters the checkpoint may lack are the index branch's. Anything else is a
different architecture and is refused, naming the tensors.

    pytest -q tests/model/test_retrofit.py
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from model.transformer import MultimodalTransformer


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept state dicts saved from a DDP- or torch.compile-wrapped model."""
    out = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def load_dense_checkpoint(model: MultimodalTransformer, dense_state: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a dense model's weights into `model`; return the names of the freshly initialised
    parameters (the index branch). Raises ValueError on any mismatch. Leaves `model` in warmup mode.
    """
    if not model.has_index_branch:
        raise ValueError("the target model has no index branch (model.msa.enabled = false): "
                         "build it with the MSA config that should be retrofitted")
    dense = _strip_prefix(dense_state)
    own = model.state_dict()
    index_names = set(model.index_parameter_names())
    problems = []
    unexpected = sorted(set(dense) - set(own))
    if unexpected:
        problems.append(f"tensors the MSA model does not have: {', '.join(unexpected[:8])}"
                        + (" ..." if len(unexpected) > 8 else ""))
    missing = sorted(set(own) - set(dense) - index_names)
    if missing:
        problems.append(f"tensors missing from the checkpoint (only the index branch may be): "
                        f"{', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    for name in sorted(set(dense) & set(own)):
        if tuple(dense[name].shape) != tuple(own[name].shape):
            problems.append(f"{name}: checkpoint shape {tuple(dense[name].shape)} != model shape {tuple(own[name].shape)}")
    if problems:
        raise ValueError("cannot retrofit this checkpoint onto the MSA model (different architecture):\n  "
                         + "\n  ".join(problems))

    fresh = sorted(index_names - set(dense))
    model.load_state_dict(dense, strict=False)
    # re-initialise what the checkpoint did not bring, the same way a new model would be
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in fresh:
            p = params[name]
            if p.dim() >= 2:
                nn.init.normal_(p, std=model.cfg.init_std)
            else:
                nn.init.ones_(p)  # RMSNorm weights
    model.set_mode("warmup")  # fresh projections select garbage: warm them up before going sparse
    return fresh
