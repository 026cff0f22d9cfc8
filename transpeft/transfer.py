"""Putting an adapter on a base: a conversion with a stated contract.

Input: an adapter folder and a loaded base (the one it was trained on, or a newer version).
Output: the base carrying the adapter with every saved weight in place, or ``IncompatibleBase``
naming each mismatch. PEFT checks shapes only and transformers merely prints a load report, so the
gate checks architecture, sizes, tokenizer and every target module before loading, and every
weight after it.

Only a mismatch is ``IncompatibleBase``. Any other failure while loading (out of memory, a CUDA
error, a bug) propagates as it is: the revalidation retries it and reports the adapter as crashed,
so the nightly reconciler runs it again, instead of recording "incompatible" for good.

``score_adapter`` is the one way an adapter is scored on a base: the revalidation, the nightly
run, the DVC transfer stage, ``transpeft evaluate`` and the study all call it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from .adapters import WEIGHTS_NAME, AdapterFileError, Manifest, read_manifest
from .bases import BUILDING, BaseInfo
from .data import Task
from .evaluate import Metrics, evaluate, evaluate_routed
from .methods import get_method
from .progress import progress as progress_of
from .regularisers import linear_shape


class IncompatibleBase(ValueError):
    """The adapter cannot be put on this base; ``mismatches`` lists why, one line each."""

    def __init__(self, adapter: Path, base: BaseInfo, mismatches: list[str]):
        self.mismatches = mismatches
        lines = "\n  - ".join(mismatches)
        super().__init__(f"adapter {adapter} cannot be loaded onto base {base.family}/{base.version}:\n  - {lines}")


def compatibility(manifest: Manifest, model: nn.Module, base: BaseInfo) -> list[str]:
    """Every reason the adapter does not fit ``model``; empty when it fits."""
    trained, target = manifest.base.signature, base.signature
    problems = []
    if trained.model_type != target.model_type or trained.architecture != target.architecture:
        problems.append(f"architecture: adapter was trained on {trained.architecture} ({trained.model_type}), "
                        f"base is {target.architecture} ({target.model_type})")
    for field, label in (("hidden_size", "hidden size"), ("num_layers", "layer count"), ("vocab_size", "vocabulary size")):
        if getattr(trained, field) != getattr(target, field):
            problems.append(f"{label}: adapter expects {getattr(trained, field)}, base has {getattr(target, field)}")
    if trained.tokenizer_hash != target.tokenizer_hash:
        problems.append("tokenizer: the base's vocabulary or special tokens differ from the one the adapter was "
                        "trained with, so token ids mean other things")
    modules = dict(model.named_modules())
    for name, shape in sorted(manifest.targets.items()):
        if name not in modules:
            problems.append(f"target module {name}: not present in the base")
            continue
        actual = linear_shape(modules[name])
        if actual is not None and list(actual) != shape:
            problems.append(f"target module {name}: adapter expects (in, out) = {tuple(shape)}, base has {actual}")
    return problems


def _check_every_weight_landed(model: nn.Module, directory: Path, method_name: str,
                               adapter_name: str | None = None) -> None:
    saved = load_file(str(directory / WEIGHTS_NAME))
    loaded = (get_peft_model_state_dict(model, adapter_name=adapter_name) if adapter_name
              else get_method(method_name).adapter_state(model))
    unmatched = sorted(set(saved) - set(loaded))
    untrained = sorted(set(loaded) - set(saved))
    differing = [k for k in sorted(set(saved) & set(loaded))
                 if not torch.equal(saved[k].to(loaded[k].device, loaded[k].dtype), loaded[k])]
    problems = [f"{len(keys)} {what}, e.g. {keys[0]}" for keys, what in (
        (unmatched, "saved weights matched no module of the base"),
        (untrained, "adapter modules on the base got no saved weight"),
        (differing, "weights differ from the file after loading"),
    ) if keys]
    if problems:
        raise ValueError("; ".join(problems))


def is_mismatch(error: BaseException) -> bool:
    """Whether a failure of ``method.load`` says the adapter does not fit the base.

    Shapes (torch's "size mismatch" in ``load_state_dict``) and module or key names (peft's
    ValueError and KeyError) are mismatches; out of memory and every other RuntimeError are not.
    """
    if isinstance(error, torch.OutOfMemoryError):
        return False
    if isinstance(error, (KeyError, ValueError)):
        return True
    return isinstance(error, RuntimeError) and "size mismatch" in str(error)


def load_adapter(model: nn.Module, base: BaseInfo, directory: str | Path, manifest: Manifest | None = None,
                 adapter_name: str | None = None) -> nn.Module:
    """``model`` (the base) carrying the adapter in ``directory``, in eval mode; see module docstring.
    ``manifest``: the folder's, when the caller has already read (and checksummed) it. ``adapter_name``:
    ``model`` is a PEFT model already holding adapters, and this one joins them under that name (with
    the LoRA adapters it was loaded with: shared batches); one refused leaves the others as they were."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)  # checks the safetensors file, which peft loads first
    problems = compatibility(manifest, model.get_base_model() if adapter_name else model, base)
    if problems:
        raise IncompatibleBase(directory, base, problems)
    method = get_method(manifest.method.name)

    def take_out(adapted):
        if adapter_name is None:
            return method.detach(adapted)
        if adapter_name in adapted.peft_config:
            adapted.delete_adapter(adapter_name)

    try:
        with BUILDING:  # an adapter's layers are made under torch's default dtype: see bases.BUILDING
            if adapter_name is None:
                adapted = method.load(model, directory)
            else:  # PeftModel.load_adapter, which from_pretrained itself calls (not transformers' DoRA-unsafe
                # one); it reads adapter_model.safetensors, which read_manifest required and checked above
                model.load_adapter(str(directory), adapter_name=adapter_name)
                adapted = model
    except Exception as e:
        if adapter_name is not None:
            take_out(model)
        if is_mismatch(e):
            raise IncompatibleBase(directory, base, [f"loading failed: {e}"]) from e
        raise
    try:
        _check_every_weight_landed(adapted, directory, manifest.method.name, adapter_name)
    except ValueError as e:
        take_out(adapted)
        raise IncompatibleBase(directory, base, [str(e)]) from None
    adapted.eval()
    return adapted


def unload_adapter(model: nn.Module, method_name: str) -> nn.Module:
    """The base model without the adapter, exactly as before ``load_adapter``."""
    return get_method(method_name).detach(model)


def refusal(error: AdapterFileError | IncompatibleBase) -> str:
    """Why an adapter could not be scored, in one line: each mismatch, or what is wrong with its files."""
    return "; ".join(error.mismatches) if isinstance(error, IncompatibleBase) else str(error)


def own_tasks(manifest: Manifest, tasks: list[Task]) -> list[Task]:
    """The tasks an adapter was trained on, among ``tasks`` (all of them if none match)."""
    return [t for t in tasks if t.name in manifest.tasks] or list(tasks)


def score_adapter(model: nn.Module, tokenizer, base: BaseInfo, directory: str | Path, tasks: list[Task],
                  manifest: Manifest | None = None, batch_size: int = 32) -> dict[str, Metrics]:
    """The adapter in ``directory`` scored on ``model`` (the base), per task; the base is bare again
    afterwards. Raises what ``load_adapter`` raises, before any scoring."""
    manifest = manifest or read_manifest(directory)
    adapted = load_adapter(model, base, directory, manifest)
    try:
        return {t.name: evaluate(adapted, tokenizer, list(t.eval), batch_size) for t in tasks}
    finally:
        unload_adapter(adapted, manifest.method.name)  # in place: ``model`` is the bare base again


# peft routes each row of a batch through its own adapter for LoRA (``adapter_names``); this many are
# loaded on the base at once when batches are shared.
ROUTED_METHODS = ("lora",)
ROUTED_GROUP = 16


def score_adapters(model: nn.Module, tokenizer, base: BaseInfo, jobs: dict, batch_size: int = 32,
                   share_batches: bool = False) -> dict:
    """Many adapters scored on one base, each on its own tasks: ``jobs`` maps a key to (folder, manifest,
    tasks). One at a time (``score_adapter``), or with ``share_batches`` LoRA adapters ROUTED_GROUP at a
    time in shared batches, each row through its own adapter. Per key: ``{task: Metrics}``, or the
    IncompatibleBase that refused the adapter; the base is bare again afterwards.

    One at a time is the default because it measured faster: 16 LoRA adapters, 32 rows each, on 2 CPU
    cores scored 0.71x / 0.86x / 0.99x as fast in shared batches on bases 32 / 128 / 512 wide
    (bench/bench_batched_eval.py): routing splits every LoRA layer into one small product per adapter
    in the batch, and a CPU gains little from the larger base batches. Where a device is starved by
    small per-adapter sets (a GPU), measure with that bench before turning it on."""
    routed = [k for k, (_, manifest, _) in jobs.items() if manifest.method.name in ROUTED_METHODS]
    if not share_batches or len(routed) < 2:
        routed = []
    results = {}
    for key in [k for k in jobs if k not in routed]:
        folder, manifest, tasks = jobs[key]
        try:
            results[key] = score_adapter(model, tokenizer, base, folder, tasks, manifest, batch_size)
        except (AdapterFileError, IncompatibleBase) as e:
            results[key] = e
    for start in range(0, len(routed), ROUTED_GROUP):
        results |= _score_routed(model, tokenizer, base, {k: jobs[k] for k in routed[start:start + ROUTED_GROUP]},
                                 batch_size)
    return results


def _score_routed(model: nn.Module, tokenizer, base: BaseInfo, jobs: dict, batch_size: int) -> dict:
    """One group of LoRA adapters on one PEFT model, under names of their own, scored in shared batches."""
    results, names, adapted = {}, {}, None
    try:
        for i, (key, (folder, manifest, _)) in enumerate(jobs.items()):
            try:
                if adapted is None:  # the first one makes the PEFT model
                    adapted = load_adapter(model, base, folder, manifest)
                    names[key] = adapted.active_adapter
                else:
                    names[key] = f"adapter-{i}"
                    load_adapter(adapted, base, folder, manifest, adapter_name=names[key])
            except IncompatibleBase as e:
                results[key] = e
                names.pop(key, None)
        if adapted is not None:
            sets = {(key, task.name): (list(task.eval), names[key]) for key in names for task in jobs[key][2]}
            scores = evaluate_routed(adapted, tokenizer, sets, batch_size)
            for key in names:
                results[key] = {task.name: scores[(key, task.name)] for task in jobs[key][2]}
    finally:
        if adapted is not None:
            adapted.unload()  # every adapter out: ``model`` is the bare base again
    return results


def evaluate_adapters(model: nn.Module, tokenizer, base: BaseInfo, adapter_dirs, tasks: list[Task],
                      batch_size: int = 32, progress: bool = False) -> dict[str, dict]:
    """Many adapters scored on one base loaded once, each on its own tasks (``score_adapters``).

    Returns, per adapter folder, ``{task: metrics}`` or ``{"error": ...}``: a failing adapter never
    stops the others.
    """
    results, jobs = {}, {}
    folders = list(adapter_dirs)
    for directory in progress_of(folders, "read", unit="adapter", enabled=progress):
        try:
            manifest = read_manifest(directory)
        except AdapterFileError as e:
            results[str(directory)] = {"error": refusal(e)}
            continue
        jobs[str(directory)] = (Path(directory), manifest, own_tasks(manifest, tasks))
    for key, scores in score_adapters(model, tokenizer, base, jobs, batch_size).items():
        results[key] = ({"error": refusal(scores)} if isinstance(scores, Exception)
                        else {task: m.as_dict() for task, m in scores.items()})
    return {str(d): results[str(d)] for d in folders}
