"""Builds the demo base family: v1 pretrained from scratch, v2 and v3 each continued from the previous one.

Every version is an ordinary transformers model folder (LlamaForCausalLM + the byte-level tokenizer,
safetensors) that ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load
like a hub model. The corpus is concentrated on the four skills the demo tasks use (see
``transpeft.demo.world``). The two updates are made the way the product meets them:

- v1 -> v2, a mild *knowledge update*: continued pretraining on the new facts (some entities' facts
  change, new entities appear), 70 % of the lines in the formats v1 read and 30 % in new ones, at a
  tenth of the pretraining learning rate, attention at a tenth of that. Updates of real bases by
  continual pretraining move the FFNs (the knowledge) and leave the attention patterns nearly as
  they were; ``family.json`` measures how far this one does, on task inputs.
- v2 -> v3, a strong update: mostly new formats, the full learning rate on every weight. Adapters are
  not expected to survive it: the gate and the re-tune must catch them.

    from transpeft.demo.family import build_demo_family
    build_demo_family(Path("bases/demo"), profile="demo")   # ~5 min on 2 CPU cores
    build_demo_family(Path("/tmp/fam"), profile="test")     # a few seconds, for unit tests

Same profile and seed give bit-identical weights (fixed seeds, fixed thread count, data drawn from
seeded generators). ``family.json`` records the recipe, tokens and seconds per version, the relative
weight drift and the attention vs FFN activation similarity between versions.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from transpeft.demo.tokenizer import demo_tokenizer
from transpeft.demo.world import PRETRAIN_FORMATS, VERSIONS, pretraining_line, world
from transpeft.progress import progress as progress_of, without_library_bars


@dataclass(frozen=True)
class Update:
    """How a version is continued from its parent: its corpus and its learning rates."""

    steps: int
    lr: float  # peak learning rate
    new_format_share: float  # share of lines in this version's formats; the rest in the parent's
    attention_lr: float = 1.0  # multiplier of ``lr`` for the attention sub-layers


@dataclass(frozen=True)
class Profile:
    """Model size and training schedule of one family build."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    seq_len: int
    batch: int
    pretrain_steps: int
    pretrain_lr: float
    updates: tuple[Update, Update]  # v1 -> v2, v2 -> v3
    n_train: int = 2000  # the demo tasks' sizes for this profile
    n_eval: int = 200
    seed: int = 0
    threads: int = 2

    def quick(self) -> Profile:
        """The same shapes and recipe in a few steps: checks the build path, learns nothing."""
        return replace(self, pretrain_steps=3, batch=4, n_train=32, n_eval=8,
                       updates=tuple(replace(u, steps=2) for u in self.updates))


PROFILES = {
    # Tiny and fast: unit tests only; learns nothing useful.
    "test": Profile(hidden=32, ffn=64, layers=2, heads=2, seq_len=64, batch=8, pretrain_steps=12, pretrain_lr=3e-3,
                    updates=(Update(4, 1e-3, 0.3, attention_lr=0.1), Update(4, 2e-3, 0.8)), n_train=32, n_eval=8),
    # 0.71 M parameters. Six narrow layers learned the skills better than four wide ones at the same
    # cost, and give knowledge dropping layers to drop; 1400 steps of 16 sequences made lookup
    # learnable where 700 of 32 (the same tokens) did not.
    "demo": Profile(hidden=96, ffn=256, layers=6, heads=4, seq_len=128, batch=16, pretrain_steps=1400,
                    pretrain_lr=3e-3, updates=(Update(500, 3e-4, 0.3, attention_lr=0.1), Update(500, 2e-3, 0.8))),
    # The scale of the earlier GPU study: 8 layers, hidden 512, SwiGLU 1536 (27.5 M parameters),
    # about 100 M tokens of pretraining (12 000 steps of 64 x 128 tokens), bf16 on a GPU.
    "gpu": Profile(hidden=512, ffn=1536, layers=8, heads=8, seq_len=128, batch=64, pretrain_steps=12000,
                   pretrain_lr=1e-3, updates=(Update(2400, 1e-4, 0.3, attention_lr=0.1), Update(2400, 7e-4, 0.8)),
                   threads=16),
}


def model_config(p: Profile, vocab_size: int, bos: int, eos: int, pad: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=p.hidden, intermediate_size=p.ffn,
                       num_hidden_layers=p.layers, num_attention_heads=p.heads,
                       num_key_value_heads=p.heads, max_position_embeddings=max(256, p.seq_len),
                       bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)


def corpus_rows(version: str, n_rows: int, p: Profile, tokenizer, rng: random.Random,
                new_format_share: float = 1.0) -> torch.Tensor:
    """``n_rows`` packed rows of ``p.seq_len`` tokens: ``<s> line </s>`` documents back to back.

    The facts are ``version``'s; a line is in ``version``'s formats with probability
    ``new_format_share``, else in the previous version's.
    """
    w = world(version)
    keys = list(w.facts)
    formats = PRETRAIN_FORMATS[version]
    old = PRETRAIN_FORMATS[VERSIONS[max(VERSIONS.index(version) - 1, 0)]]
    need = n_rows * p.seq_len
    ids: list[int] = []
    while len(ids) < need:
        # Draw in chunks: the Rust tokenizer encodes a batch far faster than line by line.
        lines = [pretraining_line(w, keys, formats if rng.random() < new_format_share else old, rng)
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


def _param_groups(model: LlamaForCausalLM, attention_lr: float) -> list[dict]:
    attention = [p for n, p in model.named_parameters() if ".self_attn." in n]
    rest = [p for n, p in model.named_parameters() if ".self_attn." not in n]
    return [{"params": attention, "scale": attention_lr}, {"params": rest, "scale": 1.0}]


def pretrain(model: LlamaForCausalLM, rows: torch.Tensor, p: Profile, steps: int, peak_lr: float,
             desc: str, progress: bool, attention_lr: float = 1.0, bf16: bool | None = None) -> float:
    """Train ``model`` in place on ``rows`` (batch after batch, in order); returns the last loss.

    ``bf16``: autocast to bfloat16; default on a GPU only (bench/bench_pretrain.py measures the CPU).
    """
    device = next(model.parameters()).device
    bf16 = device.type == "cuda" if bf16 is None else bf16
    opt = torch.optim.AdamW(_param_groups(model, attention_lr), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    loss = torch.tensor(float("nan"))
    bar = progress_of(range(steps), desc, enabled=progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr) * group["scale"]
        batch = rows[step * p.batch:(step + 1) * p.batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
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
        diff = sum(float((new[n].float() - old[n].float()).pow(2).sum()) for n in names)
        base = sum(float(old[n].float().pow(2).sum()) for n in names)
        drift[group] = round(math.sqrt(diff / base), 4)
    return drift


def task_inputs(n_per_task: int = 48) -> list[str]:
    """Prompts with their answers from every demo task: the inputs the similarity is measured on."""
    from transpeft.demo.tasks import demo_task_examples

    return [ex.prompt + ex.answer for examples in demo_task_examples(n_per_task).values() for ex in examples]


def similarity_summary(rows: list[dict]) -> dict:
    """Per-layer attention vs FFN output similarity, and their means over layers."""
    return {"attention": round(sum(r["attention"] for r in rows) / len(rows), 4),
            "ffn": round(sum(r["ffn"] for r in rows) / len(rows), 4), "layers": rows}


def build_demo_family(out: Path, profile: str = "demo", progress: bool = True, quick: bool = False,
                      name: str | None = None) -> dict:
    """Build ``out/v1``, ``out/v2``, ``out/v3`` and ``out/family.json``; returns family.json's content.
    ``name``: the family's, which its versions register as (default: ``out``'s folder name)."""
    from transpeft.drift import activation_similarity

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; one of {', '.join(PROFILES)}")
    p = PROFILES[profile].quick() if quick else PROFILES[profile]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and profile == "gpu" else "cpu")
    torch.set_num_threads(p.threads)  # the thread count changes reduction order, so fix it
    torch.manual_seed(p.seed)
    tokenizer = demo_tokenizer()
    config = model_config(p, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).to(device)
    family = {"family": name or out.resolve().name, "profile": profile, "quick": quick, "settings": asdict(p),
              "versions": {}, "drift": {}, "similarity": {}}
    probe = task_inputs()
    without_library_bars()  # the saves below would draw one each
    snapshots: dict[str, LlamaForCausalLM] = {}
    for i, version in enumerate(VERSIONS):
        start = time.perf_counter()
        rng = random.Random(f"{p.seed}-{version}")
        update = p.updates[i - 1] if i else Update(p.pretrain_steps, p.pretrain_lr, 1.0)
        rows = corpus_rows(version, update.steps * p.batch, p, tokenizer, rng, update.new_format_share)
        torch.manual_seed(p.seed + i)
        loss = pretrain(model, rows, p, update.steps, update.lr, f"pretrain {version}", progress, update.attention_lr)
        model.save_pretrained(out / version)
        tokenizer.save_pretrained(out / version)
        family["versions"][version] = {
            "parent": VERSIONS[i - 1] if i else None,
            "recipe": asdict(update),
            "tokens": rows.numel(),
            "final_loss": round(loss, 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        snapshots[version] = LlamaForCausalLM(config).to(device).eval()
        snapshots[version].load_state_dict(model.state_dict())
        for earlier in VERSIONS[:i]:
            if earlier == VERSIONS[i - 1] or earlier == VERSIONS[0]:
                pair = f"{earlier}->{version}"
                family["drift"][pair] = relative_drift(snapshots[earlier].state_dict(), model.state_dict())
                family["similarity"][pair] = similarity_summary(
                    activation_similarity(snapshots[earlier], snapshots[version], tokenizer, probe))
    family["seconds"] = round(sum(v["seconds"] for v in family["versions"].values()), 1)
    (out / "family.json").write_text(json.dumps(family, indent=2) + "\n", encoding="utf-8")
    return family


def ensure_demo_family(out: Path, profile: str, quick: bool = False, say=print, name: str | None = None) -> dict:
    """The family under ``out``, built unless ``family.json`` says it already is this profile's."""
    meta = Path(out) / "family.json"
    if meta.is_file():
        family = json.loads(meta.read_text())
        if family.get("profile") == profile and family.get("quick", False) == quick:
            return family
    say(f"building the {profile} demo family into {out}{' (quick)' if quick else ''}")
    return build_demo_family(Path(out), profile, progress=True, quick=quick, name=name)
