"""How far a base update moved the weights: relative drift per decoder layer, attention vs FFN.

    drift = ||W_new - W_old||_F / ||W_old||_F   over the 2-D weights of the sub-layer

The paper's intuition is that continual pretraining moves the FFNs (knowledge) more than attention;
an earlier study on self-built 27.5 M-parameter bases (README, "What this builds on") saw attention
and FFN weights drift alike (0.164 vs 0.167), so the report measures it instead of assuming it.
Sub-layers are found by structure, as the regularisers find them.
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


@torch.no_grad()
def activation_similarity(old: nn.Module, new: nn.Module, tokenizer, texts: list[str]) -> list[dict]:
    """Per decoder layer, how alike the two versions' sub-layer outputs are on the same inputs.

    Each layer's attention output and FFN output is captured on ``texts`` (task inputs) in both
    models; the cosine similarity between the old and the new output is averaged over every real
    token. The paper's reading of real updates: attention outputs stay alike, FFN outputs move.
    """
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    outputs = []
    for model in (old, new):
        captured: dict[tuple[int, str], torch.Tensor] = {}
        handles = []
        for site in find_ffn_sites(model):
            for kind, module in (("attention", getattr(site.layer, find_attention_slot(site.layer))), ("ffn", site.slot)):
                def hook(_module, _args, output, key=(site.layer_index, kind)):
                    captured[key] = (output[0] if isinstance(output, tuple) else output).float()
                handles.append(module.register_forward_hook(hook))
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()
        outputs.append(captured)
    mask = batch["attention_mask"].bool()
    rows = []
    for layer in sorted({i for i, _ in outputs[0]}):
        row = {"layer": layer}
        for kind in ("attention", "ffn"):
            a, b = outputs[0][(layer, kind)].cpu(), outputs[1][(layer, kind)].cpu()
            row[kind] = round(float(torch.nn.functional.cosine_similarity(a, b, dim=-1)[mask].mean()), 4)
        rows.append(row)
    return rows
