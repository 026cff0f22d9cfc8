"""Ways to carry an adapter over to a new base version, tried in the gate's order until one passes.

Each is a function from what it may use (``Means``) to a candidate on the new base (``Attempt``),
recorded with its name, what it used, its optimizer steps and its seconds:

    direct    the adapter loaded as it is                                  uses nothing
    scaled    its update times alpha, the alpha that scores best on a      uses the labels of the held-out
              held-out slice of the evaluation set                          slice, never the gate's rows
    distill   re-tuned without labels to imitate the old base with the     uses prompts: the task's stored
              adapter: KL divergence on the answer positions the teacher    inputs, answers dropped, or ones
              generates, Trans-PEFT's regularisers on                       the old base writes from seeds
    retune    re-tuned on the labelled training data, warm-started         uses every training label

``scaled`` multiplies what the adapter adds to the base: LoRA's and DoRA's low-rank update (B), a
bottleneck's output (its up projection), IA3's rescaling vectors around 1. When the policy tries it,
``gate.held_out`` of each task's eval rows (chosen by a hash of the row, so the same rows every time)
are kept for it, and every strategy of that revalidation is judged on the remaining rows.

``distill``'s teacher is the old base with the adapter, the version the adapter was served on; the
student is the new base with the transferred adapter as its start. The teacher answers each prompt
greedily; the student learns the teacher's whole next-token distribution at those answer positions.
With ``gate.prompts: synthetic`` the prompts themselves come from the old base without the adapter,
sampled after up to 8 stored prompts (``gate.seed_examples``), so no stored input beyond those is needed.
"""

from __future__ import annotations

import hashlib
import random
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .adapters import Manifest, save_adapter
from .bases import BaseLoadError
from .batching import IGNORE, special_ids
from .data import Example, Task
from .evaluate import evaluate
from .params import Gate
from .seeding import seeded
from .train import TrainConfig, TrainingDiverged, train_adapter
from .transfer import load_adapter, score_adapter, unload_adapter

MAX_ANSWER_TOKENS = 128  # a teacher's answer that has not ended by then is dropped, not cut
MAX_PROMPT_TOKENS = 256  # a synthetic prompt likewise, and it is cut at twice the longest seed


@dataclass
class Means:
    """What a strategy may use to carry one adapter over."""

    name: str  # the adapter's
    slot: object  # the new base, lent: .model, .tokenizer, .info; bare again when a strategy returns
    adapter_dir: Path
    manifest: Manifest
    tasks: list[Task]
    gate_rows: dict[str, list[Example]]  # what the gate scores, per task
    held_out: dict[str, list[Example]]  # kept from the gate for scaled's alpha (empty unless scaled is tried)
    gate: Gate
    workdir: Path  # a strategy's new files go in <workdir>/<name>-<what it made>
    teacher: Callable[[], AbstractContextManager] | None = None  # lends the old base (distill)
    progress: bool = False
    batch_size: int = 32  # of scoring


@dataclass
class Attempt:
    """One strategy's candidate and what it took; ``adapter_dir`` None when it did not apply."""

    strategy: str
    adapter_dir: str | None
    scores: dict[str, float] = field(default_factory=dict)  # exact match per task, on the gate's rows
    manifest: Manifest | None = None
    used: dict[str, int] = field(default_factory=dict)  # labels, prompts, synthetic_prompts, seed_examples
    steps: int = 0
    seconds: float = 0.0
    note: str = ""  # e.g. "alpha 0.75", or why it did not apply
    passed: bool = False
    reasons: list[str] = field(default_factory=list)

    def line(self) -> str:
        """What it did, for the gate's reasons: e.g. ``retune: passes (used 2000 labels, 100 steps)``."""
        used = describe_used(self.used)
        cost = ", ".join(filter(None, [f"used {used}" if used else "", f"{self.steps} steps" if self.steps else ""]))
        verdict = "does not apply" if self.adapter_dir is None else "passes" if self.passed else "fails"
        said = "; ".join(x for x in (self.note, cost) if x)
        return f"{self.strategy}: {verdict}" + (f" ({said})" if said else "")

    def as_dict(self) -> dict:
        return {"strategy": self.strategy, "passed": self.passed, "scores": self.scores, "used": self.used,
                "steps": self.steps, "seconds": round(self.seconds, 2), "note": self.note, "reasons": self.reasons}


def verdict(exact_match: float, passed: bool) -> str:
    """A strategy's mean exact match (%) and the gate's verdict on it, as the flow's log and the demo
    report show it: ``91.0 ✓`` (passed, so it carried the adapter) or ``4.2 ✗``."""
    return f"{100 * exact_match:.1f} {'✓' if passed else '✗'}"


def describe_used(used: dict[str, int]) -> str:
    """What a strategy used, in words: ``2000 labels``, ``256 prompts``; empty for nothing."""
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in used.items() if v)


# -- which eval rows the gate scores ------------------------------------------------------------

def split_eval(task: Task, share: float) -> tuple[list[Example], list[Example]]:
    """(held out, gate rows) of the task's eval set: a row is held out when a hash of it falls in the
    first ``share`` of the range, so the split is the same in every process and every run."""
    held, kept = [], []
    for ex in task.eval:
        digest = hashlib.sha256(f"{task.name}\0{ex.prompt}\0{ex.answer}".encode()).digest()
        (held if int.from_bytes(digest[:8], "big") < share * 2**64 else kept).append(ex)
    if not held or not kept:  # a tiny eval set: at least one row on each side
        rows = list(task.eval)
        cut = min(max(round(share * len(rows)), 1), len(rows) - 1)
        held, kept = rows[:cut], rows[cut:]
    return held, kept


def _scores(model, tokenizer, rows: dict[str, list[Example]], batch_size: int) -> dict[str, float]:
    return {task: evaluate(model, tokenizer, examples, batch_size).exact_match for task, examples in rows.items()}


# -- the strategies ----------------------------------------------------------------------------

def direct(means: Means) -> Attempt:
    """The adapter on the new base as it is."""
    started = time.perf_counter()
    slot = means.slot
    on_gate_rows = [replace(t, eval=tuple(means.gate_rows[t.name])) for t in means.tasks]
    scored = score_adapter(slot.model, slot.tokenizer, slot.info, means.adapter_dir, on_gate_rows, means.manifest,
                           means.batch_size)
    return Attempt("direct", str(means.adapter_dir), {t: m.exact_match for t, m in scored.items()}, means.manifest,
                   seconds=time.perf_counter() - started)


# What each method adds to the base, as parameter-name suffixes, and how alpha scales it.
_UPDATES: dict[str, tuple[tuple[str, ...], Callable[[torch.Tensor, float], torch.Tensor]]] = {
    "lora": ((".lora_B.default.weight",), lambda w, alpha: w * alpha),
    "dora": ((".lora_B.default.weight",), lambda w, alpha: w * alpha),
    "bottleneck": ((".adapter.up.weight", ".adapter.up.bias"), lambda w, alpha: w * alpha),
    "ia3": ((".ia3_l.default",), lambda w, alpha: 1 + alpha * (w - 1)),
}


def scaled(means: Means) -> Attempt:
    """The transferred update times the alpha of ``gate.alphas`` (or 1) that scores best on the held-out
    rows; a candidate only when that alpha is not 1, which ``direct`` already judged."""
    started = time.perf_counter()
    slot, method = means.slot, means.manifest.method.name
    held = sum(len(rows) for rows in means.held_out.values())
    adapted = load_adapter(slot.model, slot.info, means.adapter_dir, means.manifest)
    try:
        suffixes, scale = _UPDATES[method]
        updates = {n: p for n, p in adapted.named_parameters() if n.endswith(suffixes)}
        if not updates:  # a layout this code does not know: say so rather than scale nothing
            return Attempt("scaled", None, note=f"no {method} update found to scale",
                           seconds=time.perf_counter() - started)
        original = {n: p.detach().clone() for n, p in updates.items()}
        tried = {}
        for alpha in sorted({1.0, *means.gate.alphas}):
            with torch.no_grad():
                for n, p in updates.items():
                    p.copy_(scale(original[n], alpha))
            on_held = _scores(adapted, slot.tokenizer, means.held_out, means.batch_size)
            tried[alpha] = sum(on_held[t] * len(means.held_out[t]) for t in on_held) / held
        best = max(tried, key=lambda a: (tried[a], -abs(a - 1)))  # ties go to the smaller change
        attempt = Attempt("scaled", None, used={"labels": held}, note=f"alpha {best:g}, held-out exact match "
                          + ", ".join(f"{a:g}: {s:.3f}" for a, s in sorted(tried.items())))
        if best == 1.0:
            attempt.note = "no alpha beats 1 on the held-out rows: " + attempt.note.split(", ", 1)[1]
            return attempt
        with torch.no_grad():
            for n, p in updates.items():
                p.copy_(scale(original[n], best))
        attempt.scores = _scores(adapted, slot.tokenizer, means.gate_rows, means.batch_size)
        out = means.workdir / f"{means.name}-scaled"
        attempt.manifest = _save(adapted, means.manifest, out, scaled_by=best)
        attempt.adapter_dir = str(out)
    finally:
        slot.model = unload_adapter(adapted, method)
    attempt.seconds = time.perf_counter() - started
    return attempt


def _save(adapted, manifest: Manifest, out: Path, **how) -> Manifest:
    """The adapter as it is now in ``adapted``, saved with its manifest saying how it was made."""
    made = replace(manifest, training={**manifest.training, **how})
    save_adapter(adapted, out, made)
    return made


def retune(means: Means) -> Attempt:
    """Re-tuned on the labelled training rows, warm-started from the transferred weights, Trans-PEFT on."""
    started = time.perf_counter()
    config = retune_config(means.manifest.training, means.gate, means.gate.retune_steps)
    labels = sum(len(t.train) for t in means.tasks)
    return _tuned(means, "retune", config, means.workdir / f"{means.name}-retuned", None, None,
                  {"labels": labels}, "", started)


def distill(means: Means) -> Attempt:
    """Re-tuned on prompts alone to answer as the old base with the adapter does (see the module)."""
    if means.teacher is None:
        return Attempt("distill", None, note="no old base to learn from: the adapter's base is not known here")
    started = time.perf_counter()
    try:
        with means.teacher() as old, seeded(means.manifest.seed):  # sampling draws from torch's generator
            return _distilled(means, old, started)
    except BaseLoadError as e:  # the old base is gone or changed: the next strategy may still carry it
        return Attempt("distill", None, seconds=time.perf_counter() - started, note=f"no teacher: {e}")


def _distilled(means: Means, old, started: float) -> Attempt:
    """distill with the old base lent in ``old``, which is bare again afterwards."""
    gate, tokenizer = means.gate, means.slot.tokenizer
    rng = random.Random(f"{means.manifest.seed}-{means.slot.info.version}")
    if gate.prompts == "synthetic":
        seeds = {t.name: [ex.prompt for ex in t.train[:gate.seed_examples]] for t in means.tasks}
        prompts = [p for task in means.tasks
                   for p in sample_prompts(old.model, tokenizer, seeds[task.name], gate.prompts_per_task, rng)]
        used = {"synthetic_prompts": len(prompts), "seed_examples": sum(len(s) for s in seeds.values())}
    else:
        prompts = [p for task in means.tasks for p in _stored_prompts(task, gate.prompts_per_task, rng)]
        used = {"prompts": len(prompts)}
    teacher = load_adapter(old.model, old.info, means.adapter_dir, means.manifest)
    try:
        answers = greedy_answers(teacher, tokenizer, prompts)
        examples = [Example(p, a) for p, a in zip(prompts, answers) if a is not None]
        if not examples:
            return Attempt("distill", None, used=used, seconds=time.perf_counter() - started,
                           note="the old base wrote no prompt like the seeds" if not prompts
                           else "the teacher ended no answer")
        config = retune_config(means.manifest.training, gate, gate.distill_steps)
        return _tuned(means, "distill", config, means.workdir / f"{means.name}-distilled", examples,
                      kl_to(teacher), {"labels": 0, **used}, f"{gate.prompts} prompts, {len(examples)} answered",
                      started)
    finally:
        old.model = unload_adapter(teacher, means.manifest.method.name)


def retune_config(training: dict, gate: Gate, steps: int) -> TrainConfig:
    """The adapter's own schedule, cut to ``steps``, with Trans-PEFT's regularisers on."""
    kept = {f.name: training[f.name] for f in fields(TrainConfig) if f.name in training}
    return TrainConfig(**{**kept, "steps": steps, "p_c": gate.retune_p_c, "p_i": gate.retune_p_i})


def _tuned(means: Means, strategy: str, config: TrainConfig, out: Path, examples, loss, used: dict, note: str,
           started: float) -> Attempt:
    slot = means.slot
    try:
        adapted, manifest, _ = train_adapter(slot.model, slot.tokenizer, slot.info, means.tasks,
                                             means.manifest.method, config, out, progress=means.progress,
                                             warm_start=means.adapter_dir, examples=examples, loss=loss,
                                             record={"strategy": strategy, "used": used})
    except TrainingDiverged as e:
        slot.broken = True  # it still carries the half-trained adapter: the lender drops it
        what = "re-tuning" if strategy == "retune" else "distillation"
        return Attempt(strategy, None, used=used, steps=config.steps, seconds=time.perf_counter() - started,
                       note=f"{what} diverged: {e}")
    try:
        if means.held_out:  # the manifest scored every eval row; the gate scores only its own
            scores = _scores(adapted, slot.tokenizer, means.gate_rows, means.batch_size)
        else:
            scores = {t: m["exact_match"] for t, m in manifest.metrics.items()}
    finally:
        slot.model = unload_adapter(adapted, means.manifest.method.name)
    return Attempt(strategy, str(out), scores, manifest, used, config.steps, time.perf_counter() - started, note)


STRATEGIES: dict[str, Callable[[Means], Attempt]] = {
    "direct": direct, "scaled": scaled, "distill": distill, "retune": retune}


# -- distillation's pieces ---------------------------------------------------------------------

def _stored_prompts(task: Task, n: int, rng: random.Random) -> list[str]:
    prompts = list(dict.fromkeys(ex.prompt for ex in task.train))  # answers dropped, repeats once
    return prompts if len(prompts) <= n else rng.sample(prompts, n)


def _room(model, prompt_length: int, wanted: int) -> int:
    """At most ``wanted`` new tokens, fewer where the model's context would end first."""
    context = getattr(model.config, "max_position_embeddings", None)
    return max(1, min(wanted, context - prompt_length)) if context else wanted


def _left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], batch_size: int = 32) -> list[str | None]:
    """The model's greedy answer to each prompt, as ``encode`` frames it ([bos] prompt answer eos);
    None where no end-of-answer came within MAX_ANSWER_TOKENS."""
    bos, eos, pad = special_ids(tokenizer)
    device = next(model.parameters()).device
    answers: list[str | None] = []
    for start in range(0, len(prompts), batch_size):
        rows = [([bos] if bos is not None else []) + tokenizer.encode(p, add_special_tokens=False)
                for p in prompts[start:start + batch_size]]
        ids, mask = _left_padded(rows, pad, device)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=_room(model, ids.shape[1], MAX_ANSWER_TOKENS),
                             eos_token_id=eos, pad_token_id=pad)[:, ids.shape[1]:].tolist()
        for new in out:
            answers.append(tokenizer.decode(new[:new.index(eos)], skip_special_tokens=True) if eos in new else None)
    return answers


@torch.no_grad()
def sample_prompts(model, tokenizer, seeds: list[str], n: int, rng: random.Random, batch_size: int = 32,
                   tries: int = 4) -> list[str]:
    """Up to ``n`` new prompts like ``seeds``, sampled from ``model`` (a base without the adapter): the seeds,
    shuffled, as documents of their own (``[bos] prompt [eos]``, as the base saw text in pretraining),
    then a new document begun, sampled until it ends. A sample is kept when it ends as the seeds do (their
    last character, e.g. a newline) and is neither a seed nor a repeat."""
    if not seeds:
        return []
    bos, eos, pad = special_ids(tokenizer)
    device = next(model.parameters()).device
    end = seeds[0][-1]
    framed = {s: ([bos] if bos is not None else []) + tokenizer.encode(s, add_special_tokens=False) + [eos]
              for s in seeds}
    longest = max(map(len, framed.values()))
    found: dict[str, None] = {}
    for _ in range(tries * max(1, -(-n // batch_size))):
        if len(found) >= n:
            break
        rows = [[t for s in rng.sample(seeds, len(seeds)) for t in framed[s]] + ([bos] if bos is not None else [])
                for _ in range(batch_size)]
        ids, mask = _left_padded(rows, pad, device)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,  # at most twice a seed's length
                             max_new_tokens=_room(model, ids.shape[1], min(MAX_PROMPT_TOKENS, 2 * longest)),
                             temperature=1.0, top_k=0, eos_token_id=eos, pad_token_id=pad)[:, ids.shape[1]:].tolist()
        for new in out:
            if eos not in new:
                continue
            prompt = tokenizer.decode(new[:new.index(eos)], skip_special_tokens=True)
            if prompt.strip() and prompt.endswith(end) and prompt not in seeds:
                found.setdefault(prompt)
    return list(found)[:n]


def kl_to(teacher) -> Callable:
    """A training loss: KL(teacher || student) of the next-token distributions at the answer positions
    (the batch's labels), averaged over them. The teacher runs without gradients, in eval mode."""

    def loss(model, batch) -> torch.Tensor:
        scored = batch.labels[:, 1:] != IGNORE
        student = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][scored]
        with torch.no_grad():
            target = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][scored]
        return F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(target.float(), -1), log_target=True,
                        reduction="batchmean")

    return loss
