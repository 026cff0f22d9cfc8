"""Reproducible training when several adapters train at once in one process (the Prefect fan-out).

torch has one global random generator per process, shared by every thread. Two trainings that each
seed it and then draw from it (an adapter's initial weights, ``nn.Dropout``) interleave their draws
in whatever order the threads run, so the same seed gave different adapters from run to run. Here:

- ``seeded(seed)`` seeds the global generators and holds them for one thread while it draws the
  adapter's initial weights;
- ``private_dropout(model, seed)`` swaps every ``nn.Dropout`` of the model for one that draws from
  its own generator while it trains, and puts the originals back afterwards;
- ``shared_draws(model, seed)`` covers what cannot be swapped: attention dropout is a float handed
  to the attention kernel (``scaled_dot_product_attention(dropout_p=...)``), which draws from the
  global generator. A model whose config asks for such dropout trains holding the global generator,
  so its trainings run one at a time; modern bases (Llama, Qwen2, Mistral: attention dropout 0)
  draw nothing there and train side by side.

Batches and Trans-PEFT's regularisers already draw from private generators, so a training run draws
nothing from the shared generator after its initialisation.

Activation checkpointing recomputes each layer's forward pass during backward. torch restores the
global generator for that, not private ones, so ``Replay`` does it for ours: every private draw
asks it for its generator, and inside a checkpointed layer it tapes the generator's state on the
first pass and hands back a generator at that state on the recomputation. Knowledge masking,
knowledge dropping and adapter dropout then draw the same masks and drops in both passes.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager

import torch
from accelerate.utils import set_seed
from torch import nn

_GLOBAL_GENERATOR = threading.RLock()


@contextmanager
def seeded(seed: int):
    """The process's global generators seeded with ``seed`` and held by this thread until the block ends."""
    with _GLOBAL_GENERATOR:
        set_seed(seed)
        yield


def functional_dropout(model: nn.Module) -> dict[str, float]:
    """The config's dropout rates above 0 (``attention_dropout``, ``attn_pdrop``, ...), by name."""
    config = getattr(model, "config", None)
    rates = config.to_dict() if config is not None else {}
    return {k: v for k, v in rates.items() if "drop" in k and isinstance(v, float) and v > 0}


@contextmanager
def shared_draws(model: nn.Module, seed: int):
    """Hold and seed the global generator for the block if the model's forward may draw from it."""
    if not functional_dropout(model):
        yield
        return
    with seeded(seed + 2000):
        yield


class Replay:
    """Private draws replayed exactly when torch's activation checkpointing recomputes a layer.

    ``contexts`` is the ``context_fn`` of ``torch.utils.checkpoint.checkpoint`` (non-reentrant): a
    fresh tape per checkpointed call, recorded on its forward pass, played on its recomputation.
    Outside checkpointing ``generator`` returns the generator itself and records nothing.
    """

    def __init__(self):
        self._tape: deque | None = None
        self._replaying = False

    @property
    def replaying(self) -> bool:
        """Inside a recomputation: its draws repeat the first pass's and should not be counted again."""
        return self._replaying

    def generator(self, generator: torch.Generator) -> torch.Generator:
        if self._tape is None:
            return generator
        if self._replaying:
            replayed = torch.Generator(device=generator.device)
            replayed.set_state(self._tape.popleft())
            return replayed
        self._tape.append(generator.get_state())
        return generator

    @contextmanager
    def _run(self, tape: deque, replaying: bool):
        outer = self._tape, self._replaying
        self._tape, self._replaying = tape, replaying
        try:
            yield
        finally:
            self._tape, self._replaying = outer

    def contexts(self):
        tape: deque = deque()
        return self._run(tape, replaying=False), self._run(tape, replaying=True)


NO_REPLAY = Replay()  # never inside a checkpoint: draws straight from the generators


class PrivateDropout(nn.Module):
    """``nn.Dropout`` (same scaling) drawing its masks from a generator of its own."""

    def __init__(self, p: float, seed: int, replay: Replay = NO_REPLAY):
        super().__init__()
        self.p, self._seed, self._replay = p, seed, replay
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        generator = self._replay.generator(self._generator(x.device))
        keep = torch.rand(x.shape, generator=generator, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class _Swapped:
    def __init__(self, swaps: list[tuple[nn.Module, str, nn.Module]]):
        self._swaps = swaps

    def remove(self) -> None:
        for parent, name, original in reversed(self._swaps):
            setattr(parent, name, original)
        self._swaps.clear()


def private_dropout(model: nn.Module, seed: int, replay: Replay = NO_REPLAY) -> _Swapped:
    """Replace each ``nn.Dropout`` with p > 0 (adapter's and base's) by a ``PrivateDropout``; ``.remove()`` undoes it."""
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                replacement = PrivateDropout(child.p, seed + 1000 + len(swaps), replay)
                replacement.train(child.training)
                setattr(parent, name, replacement)
                swaps.append((parent, name, child))
    return _Swapped(swaps)
