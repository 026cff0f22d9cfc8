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
    prefix: int = 0  # tokens before the prompt (bos), kept by truncation


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


def encode(tokenizer, example: Example) -> Encoded:
    bos, eos, _ = special_ids(tokenizer)
    prompt = tokenizer.encode(example.prompt, add_special_tokens=False)
    answer = tokenizer.encode(example.answer, add_special_tokens=False)
    ids = ([bos] if bos is not None else []) + prompt
    start = len(ids)
    ids = ids + answer + [eos]
    return Encoded(ids, start, prefix=1 if bos is not None else 0)


class TooLong(ValueError):
    """Rows longer than max_length, with too_long = refuse."""


TOO_LONG = ("refuse", "truncate")


def fit_length(encoded: list[Encoded], examples: list[Example], max_length: int | None,
               too_long: str = "refuse") -> tuple[list[Encoded], int]:
    """The rows within ``max_length`` tokens and how many were over it: refused (TooLong, naming the
    count and the longest) or truncated. Truncation drops the start of the prompt, which keeps the
    answer whole; an answer longer than the limit by itself loses its end."""
    if max_length is None:
        return encoded, 0
    over = [i for i, e in enumerate(encoded) if len(e.ids) > max_length]
    if not over:
        return encoded, 0
    if too_long == "refuse":
        longest = max(over, key=lambda i: len(encoded[i].ids))
        raise TooLong(f"{len(over)} of {len(encoded)} training rows are longer than max_length {max_length} "
                      f"tokens (the longest, {len(encoded[longest].ids)} tokens, starts "
                      f"{examples[longest].prompt[:40]!r}): raise max_length, or set too_long to truncate "
                      "to cut the start of their prompts")
    return [_truncate(e, max_length) if len(e.ids) > max_length else e for e in encoded], len(over)


def _truncate(e: Encoded, max_length: int) -> Encoded:
    excess = len(e.ids) - max_length
    cut = min(excess, e.answer_start - e.prefix)  # prompt tokens dropped after bos
    ids = e.ids[:e.prefix] + e.ids[e.prefix + cut:]
    return Encoded(ids[:max_length], e.answer_start - cut, e.prefix)


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
