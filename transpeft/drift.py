"""How far a base update moved the weights: relative drift per decoder layer, attention vs FFN.

    drift = ||W_new - W_old||_F / ||W_old||_F   over the 2-D weights of the sub-layer

The paper's intuition is that continual pretraining moves the FFNs (knowledge) more than attention;
on self-built bases both drift alike (shared/RESEARCH.md), so the report measures it instead of
assuming it. Sub-layers are found by structure, as the regularisers find them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .regularisers import find_attention_slot, find_ffn_sites


def _drift(old: nn.Module, new: nn.Module) -> float:
    new_params = dict(new.named_parameters())
    diff = base = 0.0
    for name, weight in old.named_parameters():
        if weight.dim() == 2:
            diff += float((new_params[name].detach() - weight.detach()).pow(2).sum())
            base += float(weight.detach().pow(2).sum())
    return math.sqrt(diff / base) if base else 0.0


@torch.no_grad()
def layer_drift(old: nn.Module, new: nn.Module) -> list[dict]:
    """One row per decoder layer: ``{"layer": i, "attention": drift, "ffn": drift}``."""
    rows = []
    for a, b in zip(find_ffn_sites(old), find_ffn_sites(new), strict=True):
        attention = find_attention_slot(a.layer)
        rows.append({"layer": a.layer_index,
                     "attention": round(_drift(getattr(a.layer, attention), getattr(b.layer, attention)), 4),
                     "ffn": round(_drift(getattr(a.layer, a.slot_name), getattr(b.layer, b.slot_name)), 4)})
    return rows
