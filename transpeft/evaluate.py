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


@dataclass(frozen=True)
class _Row:
    exact: bool
    right: int  # answer tokens right
    total: int  # answer tokens
    loss: float  # summed cross-entropy over them


@torch.no_grad()
def exact_match_flags(model, tokenizer, examples: list[Example], batch_size: int = 32) -> list[bool]:
    """Per-example teacher-forced exact match, in the order given."""
    return [row.exact for row in _score(model, tokenizer, examples, batch_size)]


@torch.no_grad()
def _score(model, tokenizer, examples, batch_size, adapter_names=None) -> list[_Row]:
    """Each example's scores, in the order given; ``adapter_names``: the adapter each one runs through."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows: list[_Row | None] = [None] * len(examples)
    try:
        for idx, batch in _in_order(examples, tokenizer, batch_size):
            batch = batch.to(device)
            routed = {"adapter_names": [adapter_names[i] for i in idx]} if adapter_names else {}
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           **routed).logits[:, :-1].float()
            targets = batch.labels[:, 1:]
            scored = targets != IGNORE
            hit = logits.argmax(-1) == targets
            per_token = F.cross_entropy(logits[scored], targets[scored], reduction="none")  # answer tokens only
            loss = torch.zeros(len(idx), device=device).index_add_(0, scored.nonzero()[:, 0], per_token)
            for row, ok, right, total, lost in zip(idx, (hit | ~scored).all(dim=1).tolist(),
                                                   (hit & scored).sum(dim=1).tolist(), scored.sum(dim=1).tolist(),
                                                   loss.tolist()):
                rows[row] = _Row(ok, right, total, lost)
    finally:
        model.train(was_training)
    return rows


def _metrics(rows: list[_Row]) -> Metrics:
    total = sum(r.total for r in rows)
    return Metrics(exact_match=sum(r.exact for r in rows) / len(rows), token_accuracy=sum(r.right for r in rows) / total,
                   answer_loss=sum(r.loss for r in rows) / total, n=len(rows))


def evaluate(model, tokenizer, examples: list[Example], batch_size: int = 32) -> Metrics:
    """Exact match, token accuracy and answer loss of ``model`` on ``examples``."""
    if not examples:
        raise ValueError("cannot evaluate on an empty set of examples")
    return _metrics(_score(model, tokenizer, examples, batch_size))


def evaluate_routed(model, tokenizer, sets: dict, batch_size: int = 32) -> dict:
    """Several adapters of one PEFT model in shared batches: ``sets`` maps a key to (examples, adapter
    name); each row runs through its own adapter (peft's mixed-adapter batches). Metrics per key."""
    keys = [key for key, (examples, _) in sets.items() if examples]
    if len(keys) < len(sets):
        raise ValueError(f"cannot evaluate on an empty set of examples: {[k for k in sets if k not in keys]}")
    examples = [ex for key in keys for ex in sets[key][0]]
    names = [sets[key][1] for key in keys for _ in sets[key][0]]
    rows = _score(model, tokenizer, examples, batch_size, names)
    out, start = {}, 0
    for key in keys:
        n = len(sets[key][0])
        out[key] = _metrics(rows[start:start + n])
        start += n
    return out


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

