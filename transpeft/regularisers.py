"""Trans-PEFT's two FFN regularisers, attached to any stock transformers causal LM.

- Knowledge masking (p_i): the FFN's intermediate activation, the input of its down projection
  (act(gate(x)) * up(x), or act(fc(x))), is multiplied element-wise by a fresh Bernoulli(1 - p_i)
  mask. No rescaling, unlike dropout.
- Knowledge dropping (p_c): each decoder layer's FFN sub-layer is skipped with probability p_c, one
  draw per layer per forward pass. Skipped means not computed: its residual branch adds nothing,
  including a norm the layer applies to the FFN's output (a post-FFN LayerNorm would otherwise add
  its bias). A module sitting in the FFN's slot that defines ``forward_without_ffn`` (the bottleneck
  adapter) is called instead, on the residual stream h: the input of the norm in front of the FFN
  when the layer has one (pre-norm), else the FFN's own input. So an adapter after the FFN still runs.

Both act only while the model is in training mode, like dropout, and draw from their own seeded
generators. Layers and FFNs are found by structure, not by model class:

    handle = attach_regularisers(model, p_i=0.05, p_c=0.1, seed=0)
    ...train...
    handle.remove()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import Probability, check
from .seeding import NO_REPLAY, Replay

_ATTENTION_WORDS = ("attn", "attention")


class NoFFNFound(ValueError):
    """The model has no decoder layers with a recognisable feed-forward sub-layer."""


def unwrap(module: nn.Module) -> nn.Module:
    """The original module under any adapter wrappers (peft layers, our bottleneck)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like module, else None."""
    module = unwrap(module)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2 stores its weight transposed
        return module.weight.shape[0], module.weight.shape[1]
    return None


@dataclass(frozen=True)
class FFNSite:
    """Where one decoder layer keeps its FFN: ``layer.<slot_name>`` and its down projection."""

    layer_index: int
    layer: nn.Module
    slot_name: str
    down_proj: nn.Module  # the outermost module (a peft wrapper if any) so adapters see the mask

    @property
    def slot(self) -> nn.Module:
        return getattr(self.layer, self.slot_name)


def _is_attention(name: str, module: nn.Module) -> bool:
    words = (name + " " + type(unwrap(module)).__name__).lower()
    return any(w in words for w in _ATTENTION_WORDS)


def _down_projection(ffn: nn.Module, hidden: int) -> nn.Module | None:
    """The FFN's down projection: the one linear child mapping some width back to ``hidden``.

    An FFN is position-wise: its weights are all in linear children (no convolutions, no state
    parameters of its own as in Mamba's mixer, no expert lists as in MoE blocks).
    """
    if any(True for _ in ffn.parameters(recurse=False)):
        return None
    shapes = {}
    for name, child in ffn.named_children():
        shape = linear_shape(child)
        if shape is None and any(True for _ in child.parameters()):
            return None
        if shape is not None:
            shapes[name] = shape
    into_hidden = [name for name, (i, o) in shapes.items() if o == hidden and i != hidden]
    from_hidden = [name for name, (i, o) in shapes.items() if i == hidden and o != hidden]
    if len(into_hidden) != 1 or not from_hidden:
        return None
    return getattr(ffn, into_hidden[0])


def _ffn_slot(layer: nn.Module, hidden: int) -> tuple[str, nn.Module] | None:
    found = []
    for name, child in layer.named_children():
        if _is_attention(name, child):
            continue
        down = _down_projection(unwrap(child), hidden)
        if down is not None:
            found.append((name, down))
    return found[0] if len(found) == 1 else None


def hidden_size(model: nn.Module) -> int:
    return model.get_input_embeddings().embedding_dim


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the longest ModuleList whose every item has an FFN."""
    hidden = hidden_size(model)
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if all(_ffn_slot(layer, hidden) for layer in module):
                if best is None or len(module) > len(best):
                    best = module
    if best is None:
        raise NoFFNFound(
            f"{type(model).__name__}: found no decoder layers with a feed-forward sub-layer "
            "(a child module with a linear projection out of and back into the hidden size). "
            "Trans-PEFT's regularisers need one; use p_i = p_c = 0 for this model."
        )
    return best


def find_ffn_sites(model: nn.Module) -> list[FFNSite]:
    """One FFNSite per decoder layer, in order."""
    hidden = hidden_size(model)
    sites = []
    for index, layer in enumerate(find_decoder_layers(model)):
        slot_name, down = _ffn_slot(layer, hidden)
        sites.append(FFNSite(index, layer, slot_name, down))
    return sites


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def find_norms(layer: nn.Module) -> list[nn.Module]:
    """The decoder layer's own norms (input, post-attention, pre- and post-FFN), not those inside sub-layers."""
    return [child for child in layer.children() if _is_norm(child)]


def find_attention_slot(layer: nn.Module) -> str:
    """Name of the decoder layer's self-attention child."""
    names = [
        n for n, c in layer.named_children()
        if _is_attention(n, c) and any(linear_shape(m) for m in unwrap(c).modules())
    ]
    if len(names) != 1:
        raise NoFFNFound(f"{type(layer).__name__}: expected one attention sub-layer, found {names or 'none'}")
    return names[0]


class Regularisers:
    """Handle for attached regularisers; ``remove()`` restores the model exactly."""

    def __init__(self, model: nn.Module, p_i: float, p_c: float, seed: int, replay: Replay = NO_REPLAY):
        p_i, p_c = check(Probability, p_i, "p_i"), check(Probability, p_c, "p_c")  # [0, 1), as everywhere
        self.p_i, self.p_c = p_i, p_c
        self.sites = find_ffn_sites(model) if (p_i or p_c) else []  # p = 0: any model, no hooks
        self._seed, self._replay = seed, replay
        self._drop_rng = torch.Generator().manual_seed(seed)
        self._mask_rngs: dict[torch.device, torch.Generator] = {}
        self._undo = []
        if p_i > 0:
            for site in self.sites:
                handle = site.down_proj.register_forward_pre_hook(self._mask)
                self._undo.append(handle.remove)
        self._normed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> its last norm's (output, input)
        self._skipped: dict[int, torch.Tensor] = {}  # layer -> the zeros its dropped FFN returned
        if p_c > 0:
            for site in self.sites:
                self._patch_forward(site)
                for norm in find_norms(site.layer):
                    self._undo.append(norm.register_forward_hook(self._norm_seen(site.layer_index)).remove)
        self.dropped = 0  # FFN sub-layers skipped so far, for logging and tests

    def _mask_rng(self, device: torch.device) -> torch.Generator:
        if device not in self._mask_rngs:
            self._mask_rngs[device] = torch.Generator(device=device).manual_seed(self._seed + 1)
        return self._mask_rngs[device]

    def _mask(self, module: nn.Module, args: tuple):
        if not module.training:
            return None
        x = args[0]
        keep = torch.rand(x.shape, generator=self._replay.generator(self._mask_rng(x.device)), device=x.device) >= self.p_i
        return (x * keep.to(x.dtype), *args[1:])

    def _norm_seen(self, layer_index: int):
        def hook(module: nn.Module, args: tuple, output):
            if not module.training or not args:
                return None
            if self._skipped.get(layer_index) is args[0]:  # a norm of the dropped FFN's output adds nothing
                return torch.zeros_like(output)
            self._normed[layer_index] = (output, args[0])
            return None
        return hook

    def _residual(self, layer_index: int, x: torch.Tensor) -> torch.Tensor:
        """h for the FFN's input x: the input of the norm that made x, else x itself (no norm in front)."""
        output, source = self._normed.get(layer_index, (None, None))
        return source if output is x else x

    def _patch_forward(self, site: FFNSite) -> None:
        slot = site.slot
        computed = slot.forward  # bound method, or an earlier instance-level patch (accelerate hooks)
        had_instance_forward = "forward" in slot.__dict__
        skipped = getattr(slot, "forward_without_ffn", None)

        def forward(*args, **kwargs):
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
            self._skipped.pop(site.layer_index, None)
            if slot.training and torch.rand((), generator=self._replay.generator(self._drop_rng)).item() < self.p_c:
                self.dropped += not self._replay.replaying
                if skipped is not None:
                    return skipped(self._residual(site.layer_index, x))
                self._skipped[site.layer_index] = zeros = torch.zeros_like(x)
                return zeros
            return computed(*args, **kwargs)

        slot.forward = forward

        def undo():
            if had_instance_forward:
                slot.forward = computed
            else:
                del slot.forward

        self._undo.append(undo)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self._normed.clear()
        self._skipped.clear()

    def __enter__(self) -> Regularisers:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach_regularisers(model: nn.Module, p_i: float = 0.0, p_c: float = 0.0, seed: int = 0,
                        replay: Replay = NO_REPLAY) -> Regularisers:
    """Attach knowledge masking (p_i) and knowledge dropping (p_c) to ``model``; see module docstring."""
    return Regularisers(model, p_i, p_c, seed, replay)
