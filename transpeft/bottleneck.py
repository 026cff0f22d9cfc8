"""The bottleneck Adapter of the Trans-PEFT paper (Houlsby-style), which peft does not provide.

A small MLP, hidden -> bottleneck -> hidden with its up projection zero-initialised, sits after a
decoder layer's attention and/or FFN sub-layer:

- serial:   out = sublayer(x) + adapter(sublayer(x))
- parallel: out = sublayer(x) + adapter(x)

When knowledge dropping skips the FFN, its residual branch adds nothing but the adapter still runs, on
the residual stream h (the input of the norm in front of the FFN): out = adapter(h)
(``forward_without_ffn``), for both variants, as the paper's reference code does for Qwen2.

Files mirror peft's: ``adapter_config.json`` and ``adapter_model.safetensors`` holding only the
adapter weights, keyed by module path.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import SUBLAYERS, BottleneckConfig  # defined with the other configuration models
from .regularisers import find_attention_slot, find_ffn_sites, hidden_size

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, config: BottleneckConfig):
        super().__init__()
        self.down = nn.Linear(hidden, config.bottleneck_size)
        self.act = ACTIVATIONS[config.non_linearity]()
        self.dropout = nn.Dropout(config.dropout)
        self.up = nn.Linear(config.bottleneck_size, hidden)
        nn.init.zeros_(self.up.weight)  # starts as the identity on the sub-layer, like LoRA's B = 0
        nn.init.zeros_(self.up.bias)
        self.scaling = config.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scaling


class BottleneckSublayer(nn.Module):
    """Wraps one attention or FFN sub-layer; outputs may be a tensor or a tuple led by one."""

    def __init__(self, base_layer: nn.Module, hidden: int, config: BottleneckConfig):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = Bottleneck(hidden, config)
        self.serial = config.variant == "serial"

    @staticmethod
    def _input(args, kwargs) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        main = out[0] if isinstance(out, tuple) else out
        main = main + self.adapter(main if self.serial else self._input(args, kwargs))
        return (main, *out[1:]) if isinstance(out, tuple) else main

    def forward_without_ffn(self, h: torch.Tensor) -> torch.Tensor:
        """The sub-layer's branch when knowledge dropping skips the FFN: the adapter alone, on h."""
        return self.adapter(h)


def _slots(model: nn.Module, config: BottleneckConfig) -> list[tuple[nn.Module, str]]:
    slots = []
    for site in find_ffn_sites(model):
        if "attention" in config.sublayers:
            slots.append((site.layer, find_attention_slot(site.layer)))
        if "ffn" in config.sublayers:
            slots.append((site.layer, site.slot_name))
    return slots


def attach(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Wrap the sub-layers in place, freeze everything but the adapters, return the model."""
    if is_attached(model):
        raise ValueError("model already carries bottleneck adapters; detach them first")
    hidden = hidden_size(model)
    ref = next(model.parameters())
    for param in model.parameters():
        param.requires_grad_(False)
    for parent, name in _slots(model, config):
        wrapped = BottleneckSublayer(getattr(parent, name), hidden, config).to(ref.device)
        setattr(parent, name, wrapped)
    model.bottleneck_config = config
    return model


def is_attached(model: nn.Module) -> bool:
    return any(isinstance(m, BottleneckSublayer) for m in model.modules())


def detach(model: nn.Module) -> nn.Module:
    """Restore the original sub-layers; the base weights were never touched."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BottleneckSublayer):
                setattr(parent, name, child.base_layer)
    model.__dict__.pop("bottleneck_config", None)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".adapter." in k}


def save(model: nn.Module, directory: Path) -> None:
    config = model.bottleneck_config
    (directory / CONFIG_NAME).write_text(json.dumps({"method": "bottleneck", **asdict(config)}, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()},
              str(directory / WEIGHTS_NAME))


def read_config(directory: Path) -> BottleneckConfig:
    raw = json.loads((directory / CONFIG_NAME).read_text())
    raw.pop("method", None)
    raw["sublayers"] = tuple(raw.get("sublayers", SUBLAYERS))
    return BottleneckConfig(**raw)


def load(model: nn.Module, directory: Path, trainable: bool = False) -> nn.Module:
    """Attach adapters as saved in ``directory`` and load their weights; every weight must land.
    Frozen unless ``trainable`` (a warm start)."""
    attach(model, read_config(directory))
    weights = load_file(str(directory / WEIGHTS_NAME))
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        detach(model)
        raise KeyError(f"bottleneck weights do not match this base: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, tensor in weights.items():
        if tensor.shape != expected[key].shape:
            detach(model)
            raise ValueError(f"{key}: adapter weight has shape {tuple(tensor.shape)}, "
                             f"this base expects {tuple(expected[key].shape)}")
    model.load_state_dict(weights, strict=False)
    for name, param in model.named_parameters():
        param.requires_grad_(trainable and ".adapter." in name)
    return model
