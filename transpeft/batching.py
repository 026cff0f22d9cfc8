"""Examples to tensors: ``[bos] prompt answer eos``, labels on the answer and eos only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Example

IGNORE = -100  # label value the loss skips


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    answer_start: int  # index of the first answer token in ids


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # IGNORE outside answers

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def special_ids(tokenizer) -> tuple[int | None, int, int]:
    """(bos, eos, pad) ids; the tokenizer must have an eos token to mark the end of an answer."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token; answers need an end marker")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer.bos_token_id, tokenizer.eos_token_id, pad


def encode(tokenizer, example: Example, max_length: int | None = None) -> Encoded:
    bos, eos, _ = special_ids(tokenizer)
    prompt = tokenizer.encode(example.prompt, add_special_tokens=False)
    answer = tokenizer.encode(example.answer, add_special_tokens=False)
    ids = ([bos] if bos is not None else []) + prompt
    start = len(ids)
    ids = ids + answer + [eos]
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"example is {len(ids)} tokens, longer than max_length {max_length}: {example.prompt[:40]!r}")
    return Encoded(ids, start)


def collate(encoded: list[Encoded], pad_id: int) -> Batch:
    width = max(len(e.ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.ids)
        input_ids[row, :n] = torch.tensor(e.ids)
        attention[row, :n] = 1
        labels[row, e.answer_start:n] = input_ids[row, e.answer_start:n]
    return Batch(input_ids, attention, labels)
