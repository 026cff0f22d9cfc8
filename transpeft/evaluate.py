"""Exact match in one teacher-forced pass, and the same verdict by greedy ``generate()``.

An answer is exactly right when, fed the gold prefix, the model's argmax at every answer position
and at the end-of-answer position is the gold token. That is precisely when greedy decoding would
produce the answer and then stop, so one batched forward replaces a decoding loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .batching import IGNORE, collate, encode, special_ids
from .data import Example


@dataclass(frozen=True)
class Metrics:
    exact_match: float  # fraction of answers entirely right (answer tokens and eos)
    token_accuracy: float  # fraction of answer tokens right, a partial-credit view
    answer_loss: float  # mean cross-entropy per answer token
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def _in_order(examples, tokenizer, batch_size):
    """Batches of (indices, Batch), length-sorted so padding stays small."""
    encoded = [encode(tokenizer, ex) for ex in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    _, _, pad = special_ids(tokenizer)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, collate([encoded[i] for i in idx], pad)


@torch.no_grad()
def exact_match_flags(model, tokenizer, examples: list[Example], batch_size: int = 32) -> list[bool]:
    """Per-example teacher-forced exact match, in the order given."""
    return _score(model, tokenizer, examples, batch_size)[0]


@torch.no_grad()
def _score(model, tokenizer, examples, batch_size):
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    exact = [False] * len(examples)
    right = total = 0
    loss_sum = 0.0
    try:
        for idx, batch in _in_order(examples, tokenizer, batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
            targets = batch.labels[:, 1:]
            scored = targets != IGNORE
            hit = logits.argmax(-1) == targets
            for row, ok in zip(idx, (hit | ~scored).all(dim=1).tolist()):
                exact[row] = ok
            right += (hit & scored).sum().item()
            total += scored.sum().item()
            loss_sum += F.cross_entropy(logits[scored], targets[scored], reduction="sum").item()
    finally:
        model.train(was_training)
    return exact, right, total, loss_sum


def evaluate(model, tokenizer, examples: list[Example], batch_size: int = 32) -> Metrics:
    """Exact match, token accuracy and answer loss of ``model`` on ``examples``."""
    if not examples:
        raise ValueError("cannot evaluate on an empty set of examples")
    exact, right, total, loss_sum = _score(model, tokenizer, examples, batch_size)
    return Metrics(
        exact_match=sum(exact) / len(exact),
        token_accuracy=right / total,
        answer_loss=loss_sum / total,
        n=len(exact),
    )


@torch.no_grad()
def generate_flags(model, tokenizer, examples: list[Example]) -> list[bool]:
    """Per-example exact match by greedy ``generate()``, one example at a time (the slow reference)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    _, eos, pad = special_ids(tokenizer)
    flags = []
    try:
        for ex in examples:
            enc = encode(tokenizer, ex)
            prompt = torch.tensor([enc.ids[:enc.answer_start]], device=device)
            gold = enc.ids[enc.answer_start:]
            out = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(gold),
                do_sample=False, eos_token_id=eos, pad_token_id=pad,
            )
            flags.append(out[0, prompt.shape[1]:].tolist() == gold)
    finally:
        model.train(was_training)
    return flags

