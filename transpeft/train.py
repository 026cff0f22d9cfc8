"""Fine-tune an adapter with Trans-PEFT: one loop for every PEFT method.

``train_adapter`` is the whole recipe (seed -> attach method -> train with the regularisers ->
evaluate -> save atomically); ``train_loop`` is the loop itself, which knows nothing of the
regularisers' inside. It runs on accelerate, on the device the base was loaded on, under bf16
autocast on a GPU (``precision``) whatever the weights' dtype.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs
from transformers import get_cosine_schedule_with_warmup

from .adapters import Manifest, adapted_targets, library_versions, save_adapter
from .bases import BUILDING, BaseInfo
from .batching import collate, encode, fit_length, special_ids
from .config import TrainConfig  # defined with the other configuration models; imported from here too
from .data import Example, Task
from .evaluate import evaluate
from .methods import MethodConfig, get_method
from .placement import placed
from .progress import progress as progress_of
from .regularisers import attach_regularisers
from .seeding import Replay, private_dropout, seeded, shared_draws

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the adapter weights became NaN or infinite; nothing was saved."""


@dataclass
class TrainResult:
    losses: list[float]  # one per optimizer step
    tokens: int
    seconds: float
    ffn_dropped: int  # FFN sub-layers skipped by knowledge dropping
    learning_rates: list[float] = field(default_factory=list)  # the rate each optimizer step used
    truncated: int = 0  # training rows cut to max_length
    padded: int = 0  # padding tokens computed alongside the ``tokens`` real ones

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def _bf16(precision: str, device: torch.device) -> bool:
    """Whether to run the forward pass under bf16 autocast: auto means on a GPU only."""
    return device.type == "cuda" if precision == "auto" else precision == "bf16"


GROUP_SPAN = 32  # batches per length-sorted group: lengths even out within it, batch order stays random


def _batches(encoded, batch_size: int, pad_id: int, seed: int, group_by_length: bool):
    """Endless shuffled micro-batches, reshuffled every epoch from a seeded generator.

    Grouped by length, each run of GROUP_SPAN batches of the shuffled order is sorted by length
    before it is cut into batches, and the epoch's batches are then shuffled: rows share a batch
    with rows of about their length, while the order the model sees them in stays random."""
    rng = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(encoded), generator=rng).tolist()
        usable = max(len(order) // batch_size, 1) * batch_size  # drop the ragged tail: equal-sized batches
        order = order[:usable]
        if group_by_length:
            span = batch_size * GROUP_SPAN
            order = [i for start in range(0, usable, span)
                     for i in sorted(order[start:start + span], key=lambda i: len(encoded[i].ids), reverse=True)]
        batches = [order[start:start + batch_size] for start in range(0, usable, batch_size)]
        if group_by_length:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=rng).tolist()]
        for rows in batches:
            yield collate([encoded[i] for i in rows], pad_id)


def answer_loss(model, batch) -> torch.Tensor:
    """Cross-entropy on the answer tokens (the batch's labels): the training loss unless told otherwise."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss


def train_loop(model, tokenizer, examples: list[Example], config: TrainConfig, progress: bool = True,
               loss_of: Callable = answer_loss) -> TrainResult:
    """Train the model's trainable parameters on ``examples``; ``loss_of(model, batch)`` (by default the
    cross-entropy on answer tokens only)."""
    if not examples:
        raise ValueError("no training examples: the dataset is empty")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; attach a PEFT method first")
    _, _, pad = special_ids(tokenizer)
    encoded, truncated = fit_length([encode(tokenizer, ex) for ex in examples], examples, config.max_length,
                                    config.too_long)
    if truncated:
        log.warning("truncated %d of %d training rows to max_length %d tokens", truncated, len(encoded),
                    config.max_length)
    if config.batch_size > len(encoded):
        log.warning("batch_size %d is larger than the %d training rows: every batch holds those %d rows",
                    config.batch_size, len(encoded), len(encoded))
    # Knowledge dropping leaves the dropped FFNs' adapter weights without gradients in that step:
    # under DDP they must be allowed to be unused (every process drops the same layers: one seed).
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.p_c > 0)
    # Precision is applied here, by autocast, not by accelerate: its state is one per process, so a
    # second training in another precision (the fan-out, a worker's next run) would be refused.
    # The model stays where load_base placed it: a base put on the CPU is not moved to a GPU.
    on_cpu = next(model.parameters()).device.type == "cpu" and torch.cuda.is_available()
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, kwargs_handlers=[ddp], cpu=on_cpu)
    bf16 = _bf16(config.precision, accelerator.device)
    # Under `accelerate launch` with several processes each draws its own batches (data parallel;
    # DDP averages the gradients); a single process draws exactly what it always did.
    batches = _batches(encoded, config.batch_size, pad, config.seed + accelerator.process_index,
                       config.group_by_length)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # Not prepared: accelerate steps a prepared scheduler once per process, which with N processes
    # would end the cosine after steps / N. Stepped here once per optimizer step, on every process.
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup * config.steps), config.steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    replay = Replay()  # private draws repeat exactly when checkpointing recomputes a layer
    regularisers = attach_regularisers(inner, config.p_i, config.p_c, config.seed, replay)
    dropouts = private_dropout(inner, config.seed, replay)  # concurrent runs stay reproducible
    if config.gradient_checkpointing:
        inner.activation_checkpointing_enable({"use_reentrant": False, "context_fn": replay.contexts})

    losses, rates, tokens, padded = [], [], 0, 0
    start = time.perf_counter()
    model.train()
    # attention dropout, if the base has any, draws from the global generator: hold it while training
    with shared_draws(inner, config.seed):
        try:
            with progress_of(range(config.steps), "train", enabled=progress) as bar:
                for step in bar:
                    rates.append(scheduler.get_last_lr()[0])
                    step_loss = 0.0
                    for _ in range(config.grad_accum):
                        batch = next(batches).to(accelerator.device)
                        with accelerator.accumulate(model):
                            with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=bf16):
                                loss = loss_of(model, batch)
                            _stop_everywhere_unless_finite(accelerator, loss, step)
                            accelerator.backward(loss)
                            if accelerator.sync_gradients:
                                accelerator.clip_grad_norm_(params, config.max_grad_norm)
                            optimizer.step()
                            if accelerator.sync_gradients:
                                scheduler.step()
                            optimizer.zero_grad()
                        step_loss += loss.item() / config.grad_accum
                        real = int(batch.attention_mask.sum())
                        tokens += real
                        padded += batch.attention_mask.numel() - real
                    losses.append(step_loss)
                    bar.set_postfix(loss=f"{step_loss:.3f}")
        finally:
            regularisers.remove()
            dropouts.remove()
            if config.gradient_checkpointing:
                inner.activation_checkpointing_disable()
            model.eval()
    if not all(torch.isfinite(p).all() for p in params):
        raise TrainingDiverged("adapter weights became NaN or infinite; lower the learning rate")
    return TrainResult(losses, tokens, time.perf_counter() - start, regularisers.dropped, rates, truncated, padded)


def _stop_everywhere_unless_finite(accelerator: Accelerator, loss: torch.Tensor, step: int) -> None:
    """Raise TrainingDiverged on every process if the loss is NaN or infinite on any of them.

    One process raising alone would leave the others blocked in the next gradient all-reduce.
    """
    finite = torch.isfinite(loss.detach()).reshape(1).float()
    if accelerator.num_processes > 1:
        finite = accelerator.gather(finite)
    if bool(finite.all()):
        return
    own = loss.item()
    what = own if not math.isfinite(own) else "NaN or infinite on another process"
    raise TrainingDiverged(f"loss became {what} at step {step + 1}; lower the learning rate or check the data")


def dataset_hash(tasks: list[Task]) -> str:
    """One hash for the tasks an adapter was trained on, from each task's content hash."""
    joined = "|".join(f"{t.name}:{t.content_hash}" for t in sorted(tasks, key=lambda t: t.name))
    return "sha256:" + hashlib.sha256(joined.encode()).hexdigest()


def train_adapter(base_model, tokenizer, base: BaseInfo, tasks: list[Task], method: MethodConfig,
                  config: TrainConfig, out: str | Path, progress: bool = True, warm_start: str | Path | None = None,
                  examples: list[Example] | None = None, loss: Callable | None = None, record: dict | None = None):
    """Train one adapter on ``tasks`` (mixed), evaluate it on their eval sets, save it to ``out``.

    ``warm_start``: an adapter folder whose weights training starts from (re-tuning a transferred
    adapter on a new base) instead of a fresh initialisation. ``examples`` and ``loss``: other rows
    and another loss than the tasks' training rows and ``answer_loss`` (distillation's); ``record``:
    what the manifest's training entry says of them.
    Returns (adapted model, manifest, train result). The base model is wrapped in place; unload
    the adapter with ``transfer.unload_adapter`` to reuse the base.
    """
    with seeded(config.seed), BUILDING:  # its initial weights from this seed, whatever other threads do
        if warm_start is None:
            model = get_method(method.name).attach(base_model, method)
        else:
            model = get_method(method.name).load(base_model, Path(warm_start), trainable=True)
    for task in tasks:
        if task.duplicates():
            log.warning("%s: %d of %d training rows repeat an earlier row; they weigh more in training (see "
                        "`transpeft data validate`)", task.name, task.duplicates(), len(task.train))
    if examples is None:
        examples = [ex for task in tasks for ex in task.train]
    result = train_loop(model, tokenizer, examples, config, progress, loss or answer_loss)
    metrics = {task.name: evaluate(model, tokenizer, list(task.eval)).as_dict() for task in tasks}
    manifest = Manifest(
        method=method, base=base, tasks=tuple(t.name for t in tasks), dataset_hash=dataset_hash(tasks),
        p_i=config.p_i, p_c=config.p_c, seed=config.seed, targets=adapted_targets(model),
        training={**asdict(config), "final_loss": result.losses[-1], "tokens": result.tokens,
                  "seconds": round(result.seconds, 2), "ffn_dropped": result.ffn_dropped, "placement": placed(model),
                  "truncated_rows": result.truncated, "padding_tokens": result.padded,
                  # what a batch really held, when the data is smaller than the batch size asked for
                  **({"batch_size_used": len(examples)} if config.batch_size > len(examples) else {}),
                  "warm_start": str(warm_start) if warm_start else None,
                  "loss_curve": [round(x, 5) for x in result.losses], **(record or {})},
        metrics=metrics, library_versions=library_versions(),
    )
    state = PartialState()
    if state.is_main_process:  # one writer when several processes trained together
        save_adapter(model, out, manifest)
    state.wait_for_everyone()
    return model, manifest, result
