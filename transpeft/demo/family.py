"""Builds the demo base family: v1 pretrained from scratch, v2 and v3 each continued from the previous one.

Every version is an ordinary transformers model folder (LlamaForCausalLM + the byte-level tokenizer,
safetensors) that ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load
like a hub model. The corpus is concentrated on the four skills the demo tasks use (see
``transpeft.demo.world``); the updates switch to other formats, change some facts and add entities,
so later versions drift away from v1 and a plain adapter stops transferring.

    from transpeft.demo.family import build_demo_family
    build_demo_family(Path("bases/demo"), profile="demo")   # ~3-4 min on 2 CPU cores
    build_demo_family(Path("/tmp/fam"), profile="test")     # a few seconds, for unit tests

Same profile and seed give bit-identical weights (fixed seeds, fixed thread count, data drawn from
seeded generators). ``family.json`` records the profile, tokens and seconds per version, and the
relative weight drift between consecutive versions.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from transpeft.demo.tokenizer import demo_tokenizer
from transpeft.demo.world import PRETRAIN_FORMATS, VERSIONS, pretraining_line, world


@dataclass(frozen=True)
class Profile:
    """Model size and training schedule of one family build."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    seq_len: int
    batch: int
    steps: tuple[int, int, int]   # optimizer steps for v1, v2, v3
    lr: tuple[float, float, float]  # peak learning rate for v1, v2, v3
    old_format_share: float = 0.2  # share of an update's lines still in the previous version's formats
    seed: int = 0
    threads: int = 2


PROFILES = {
    # Tiny and fast: unit tests only; learns nothing useful.
    "test": Profile(hidden=32, ffn=64, layers=2, heads=2, seq_len=64, batch=8,
                    steps=(12, 4, 4), lr=(3e-3, 1e-3, 2e-3)),
    # The 0.92 M-parameter model RESEARCH.md measured at ~22 k tokens/s on 2 cores.
    "demo": Profile(hidden=128, ffn=384, layers=4, heads=4, seq_len=128, batch=32,
                    steps=(700, 250, 250), lr=(3e-3, 7e-4, 2e-3)),
}


def model_config(p: Profile, vocab_size: int, bos: int, eos: int, pad: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=p.hidden, intermediate_size=p.ffn,
                       num_hidden_layers=p.layers, num_attention_heads=p.heads,
                       num_key_value_heads=p.heads, max_position_embeddings=max(256, p.seq_len),
                       bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)


def corpus_rows(version: str, n_rows: int, p: Profile, tokenizer, rng: random.Random) -> torch.Tensor:
    """``n_rows`` packed rows of ``p.seq_len`` tokens: ``<s> line </s>`` documents back to back."""
    w = world(version)
    keys = list(w.facts)
    formats = PRETRAIN_FORMATS[version]
    old = PRETRAIN_FORMATS[VERSIONS[max(VERSIONS.index(version) - 1, 0)]]
    need = n_rows * p.seq_len
    ids: list[int] = []
    while len(ids) < need:
        # Draw in chunks: the Rust tokenizer encodes a batch far faster than line by line.
        lines = [pretraining_line(w, keys, old if rng.random() < p.old_format_share else formats, rng)
                 for _ in range(4096)]
        for enc in tokenizer(lines, add_special_tokens=True)["input_ids"]:
            ids.extend(enc + [tokenizer.eos_token_id])
    return torch.tensor(ids[:need]).view(n_rows, p.seq_len)


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warmup over 5 % of the steps, then cosine decay to 10 % of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(model: LlamaForCausalLM, rows: torch.Tensor, p: Profile, steps: int, peak_lr: float,
             desc: str, progress: bool) -> float:
    """Train ``model`` in place on ``rows`` (batch after batch, in order); returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr)
        batch = rows[step * p.batch:(step + 1) * p.batch]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return float(loss.item())


def relative_drift(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, float]:
    """||W_new - W_old|| / ||W_old|| over attention, FFN and all decoder-layer matrices."""
    groups = {"attention": ("self_attn.",), "ffn": ("mlp.",), "all": ("self_attn.", "mlp.")}
    drift = {}
    for group, words in groups.items():
        names = [n for n in old if old[n].dim() == 2 and any(w in n for w in words)]
        diff = sum(float((new[n] - old[n]).pow(2).sum()) for n in names)
        base = sum(float(old[n].pow(2).sum()) for n in names)
        drift[group] = round(math.sqrt(diff / base), 4)
    return drift


def build_demo_family(out: Path, profile: str = "demo", progress: bool = True) -> dict:
    """Build ``out/v1``, ``out/v2``, ``out/v3`` and ``out/family.json``; returns family.json's content."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; one of {', '.join(PROFILES)}")
    p = PROFILES[profile]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(p.threads)  # the thread count changes reduction order, so fix it
    torch.manual_seed(p.seed)
    tokenizer = demo_tokenizer()
    config = model_config(p, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                          tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    family = {"profile": profile, "settings": asdict(p), "versions": {}, "drift": {}}
    first = previous = None
    for i, version in enumerate(VERSIONS):
        start = time.perf_counter()
        rng = random.Random(f"{p.seed}-{version}")
        rows = corpus_rows(version, p.steps[i] * p.batch, p, tokenizer, rng)
        torch.manual_seed(p.seed + i)
        loss = pretrain(model, rows, p, p.steps[i], p.lr[i], f"pretrain {version}", progress)
        model.save_pretrained(out / version)
        tokenizer.save_pretrained(out / version)
        weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
        family["versions"][version] = {
            "parent": VERSIONS[i - 1] if i else None,
            "tokens": rows.numel(),
            "steps": p.steps[i],
            "peak_lr": p.lr[i],
            "final_loss": round(loss, 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        if previous is not None:
            family["drift"][f"{VERSIONS[i - 1]}->{version}"] = relative_drift(previous, weights)
        if i >= 2:  # how far the family has moved from v1 in all
            family["drift"][f"{VERSIONS[0]}->{version}"] = relative_drift(first, weights)
        first = weights if i == 0 else first
        previous = weights
    family["seconds"] = round(sum(v["seconds"] for v in family["versions"].values()), 1)
    (out / "family.json").write_text(json.dumps(family, indent=2) + "\n", encoding="utf-8")
    return family
