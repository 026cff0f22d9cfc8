"""Putting an adapter on a base: a conversion with a stated contract.

Input: an adapter folder and a loaded base (the one it was trained on, or a newer version).
Output: the base carrying the adapter with every saved weight in place, or ``IncompatibleBase``
naming each mismatch. PEFT checks shapes only and transformers merely prints a load report, so the
gate checks architecture, sizes, tokenizer and every target module before loading, and every
weight after it.

Only a mismatch is ``IncompatibleBase``. Any other failure while loading (out of memory, a CUDA
error, a bug) propagates as it is: the revalidation retries it and reports the adapter as crashed,
so the nightly reconciler runs it again, instead of recording "incompatible" for good.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .adapters import WEIGHTS_NAME, Manifest, read_manifest
from .bases import BaseInfo
from .methods import get_method
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


def _check_every_weight_landed(model: nn.Module, directory: Path, method_name: str) -> None:
    saved = load_file(str(directory / WEIGHTS_NAME))
    loaded = get_method(method_name).adapter_state(model)
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


def load_adapter(model: nn.Module, base: BaseInfo, directory: str | Path) -> nn.Module:
    """``model`` (the base) carrying the adapter in ``directory``, in eval mode; see module docstring."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = compatibility(manifest, model, base)
    if problems:
        raise IncompatibleBase(directory, base, problems)
    method = get_method(manifest.method.name)
    try:
        adapted = method.load(model, directory)
    except Exception as e:
        if is_mismatch(e):
            raise IncompatibleBase(directory, base, [f"loading failed: {e}"]) from e
        raise
    try:
        _check_every_weight_landed(adapted, directory, manifest.method.name)
    except ValueError as e:
        method.detach(adapted)
        raise IncompatibleBase(directory, base, [str(e)]) from None
    adapted.eval()
    return adapted


def unload_adapter(model: nn.Module, method_name: str) -> nn.Module:
    """The base model without the adapter, exactly as before ``load_adapter``."""
    return get_method(method_name).detach(model)


def transfer_fleet(model: nn.Module, tokenizer, target: BaseInfo, adapter_dirs: list[Path], tasks,
                   old_metrics: dict[str, dict] | None = None, batch_size: int = 32,
                   progress: bool = False) -> dict[str, dict]:
    """Put each adapter on ``target`` (loaded once) and score it on its tasks.

    Returns, per adapter folder, ``{"verdict": "compatible", "old": ..., "new": ..., "retention": ...}`` or
    ``{"verdict": "incompatible" | "unreadable", "mismatches": [...]}``. ``old`` is the metric on the old
    base: ``old_metrics[folder]`` when given, else what the manifest recorded at training.
    A failing adapter never stops the others.
    """
    from tqdm.auto import tqdm

    from .adapters import AdapterFileError
    from .evaluate import evaluate

    outcomes = {}
    for directory in tqdm(adapter_dirs, desc="evaluate", unit="adapter", disable=not progress, leave=False):
        key = str(directory)
        try:
            manifest = read_manifest(directory)
            adapted = load_adapter(model, target, directory)
        except AdapterFileError as e:
            outcomes[key] = {"verdict": "unreadable", "mismatches": [str(e)]}
            continue
        except IncompatibleBase as e:
            outcomes[key] = {"verdict": "incompatible", "mismatches": e.mismatches}
            continue
        try:
            own = [t for t in tasks if t.name in manifest.tasks] or list(tasks)
            new = {t.name: evaluate(adapted, tokenizer, list(t.eval), batch_size).as_dict() for t in own}
        finally:
            model = unload_adapter(adapted, manifest.method.name)
        old = (old_metrics or {}).get(key, manifest.metrics)
        retention = {t: new[t]["exact_match"] / old[t]["exact_match"] if old.get(t, {}).get("exact_match") else None
                     for t in new}
        outcomes[key] = {"verdict": "compatible", "trained_on": f"{manifest.base.family}/{manifest.base.version}",
                         "old": old, "new": new, "retention": retention}
    return outcomes
