"""PEFT methods: a config plus how to attach, save, load and detach it. One registry entry each.

LoRA, DoRA and IA3 come from peft; the paper's bottleneck adapter from ``bottleneck.py``. Every
method's files are ``adapter_config.json`` + ``adapter_model.safetensors``; peft methods are loaded
only with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn

from . import bottleneck
from .config import MethodConfig  # defined with the other configuration models; imported from here too
from .defaults import ALL_LINEAR

# peft's PeftModel asks transformers' model for `is_gradient_checkpointing`, which transformers 5 has
# deprecated: a FutureWarning at every adapter attached or loaded, about code that is not ours.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class Method:
    attach: Callable[[nn.Module, MethodConfig], nn.Module]  # returns the trainable model
    save: Callable[[nn.Module, Path], None]
    load: Callable[..., nn.Module]  # (model, directory, trainable=False): the adapted model
    detach: Callable[[nn.Module], nn.Module]  # returns the base model, as it was
    adapter_state: Callable[[nn.Module], dict[str, torch.Tensor]]  # keyed as in the weights file


def attention_projections(model: nn.Module) -> list[str] | str:
    """The linear layers of the decoder layers' attention sub-layers, found by structure: q_proj, k_proj,
    v_proj, o_proj on Llama; c_attn, c_proj on GPT-2. Short names where they match nothing outside
    attention, else full names; all-linear for a model without such layers."""
    from .regularisers import NoFFNFound, find_attention_slot, find_ffn_sites, linear_shape

    try:
        sites = find_ffn_sites(model)
    except NoFFNFound:
        return ALL_LINEAR
    names = {id(m): n for n, m in model.named_modules()}
    inside = []
    for site in sites:
        attention = getattr(site.layer, find_attention_slot(site.layer))
        inside += [f"{names[id(attention)]}.{n}" for n, m in attention.named_modules()
                   if n and "." not in n and linear_shape(m) is not None]
    if not inside:
        return ALL_LINEAR
    short = sorted({n.rsplit(".", 1)[1] for n in inside})
    everywhere = {n for n, m in model.named_modules() if linear_shape(m) is not None and n.rsplit(".", 1)[-1] in short}
    return short if everywhere == set(inside) else inside


def _peft_method(make_config: Callable[[MethodConfig, nn.Module], object]) -> Method:
    return Method(
        attach=lambda model, cfg: get_peft_model(model, make_config(cfg, model)),
        save=lambda model, directory: model.save_pretrained(str(directory)),
        load=lambda model, directory, trainable=False: PeftModel.from_pretrained(model, str(directory),
                                                                                  is_trainable=trainable),
        detach=lambda model: model.unload(),
        adapter_state=lambda model: get_peft_model_state_dict(model),
    )


def _lora(cfg: MethodConfig, model: nn.Module, use_dora: bool = False) -> LoraConfig:
    if cfg.target_modules is None:
        targets = attention_projections(model)
    else:
        targets = ALL_LINEAR if cfg.target_modules == (ALL_LINEAR,) else list(cfg.target_modules)
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=use_dora,
                      target_modules=targets, task_type="CAUSAL_LM")


def _ia3(cfg: MethodConfig, model: nn.Module) -> IA3Config:
    targets = list(cfg.target_modules) if cfg.target_modules else None  # peft's per-architecture default
    return IA3Config(target_modules=targets, feedforward_modules=[] if targets else None, task_type="CAUSAL_LM")


def _bottleneck_config(cfg: MethodConfig) -> bottleneck.BottleneckConfig:
    return bottleneck.BottleneckConfig(
        bottleneck_size=cfg.r, variant=cfg.variant, dropout=cfg.dropout,
        sublayers=tuple(cfg.target_modules) if cfg.target_modules else bottleneck.SUBLAYERS,
    )


METHODS: dict[str, Method] = {
    "lora": _peft_method(_lora),
    "dora": _peft_method(lambda cfg, model: _lora(cfg, model, use_dora=True)),
    "ia3": _peft_method(_ia3),
    "bottleneck": Method(
        attach=lambda model, cfg: bottleneck.attach(model, _bottleneck_config(cfg)),
        save=bottleneck.save,
        load=bottleneck.load,
        detach=bottleneck.detach,
        adapter_state=bottleneck.adapter_state_dict,
    ),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown PEFT method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
