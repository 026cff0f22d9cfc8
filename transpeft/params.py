"""params.yaml as typed, validated objects: configuration enters once, here.

Each top-level key belongs to one dvc.yaml stage of the same name (prepare, bases, train, transfer,
report) or to the Prefect side (gate, nightly, fanout, tracking); ``placement`` (device and dtype)
to every stage and flow that runs a model. A bad value fails on load with the key's
path, e.g. ``params.yaml: train.runs.transpeft-v1.p_c must be in [0, 1), got 1.5``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from . import defaults
from .methods import MethodConfig
from .placement import Placement
from .study import StudyConfig
from .train import TrainConfig


class ParamsError(ValueError):
    """params.yaml is missing a key or holds a bad value; the message names the key."""


@dataclass(frozen=True)
class Prepare:
    tasks: dict[str, str]  # task name -> source: the demo generator's path, or a task folder
    seed: int = 0
    n_train: int = 2000
    n_eval: int = 200


@dataclass(frozen=True)
class Bases:
    family: str
    versions: tuple[str, ...]  # oldest first
    profile: str = "demo"  # the self-built demo family: demo, or test (seconds)
    sources: dict = field(default_factory=dict)  # real bases: version -> directory or hub id[@revision]

    @property
    def is_demo(self) -> bool:
        return not self.sources


@dataclass(frozen=True)
class Run:
    """One training configuration of the grid: which base, which regularisers."""

    base: str
    p_c: float = 0.0
    p_i: float = 0.0


@dataclass(frozen=True)
class Train:
    tasks: tuple[str, ...]
    method: MethodConfig
    schedule: dict  # TrainConfig fields other than p_c, p_i
    runs: dict[str, Run]

    def config(self, run: str) -> TrainConfig:
        spec = self.runs[run]
        return TrainConfig(**self.schedule, p_c=spec.p_c, p_i=spec.p_i)


@dataclass(frozen=True)
class Gate:
    min_retention: float  # new-base metric / old-base metric
    min_score: float  # absolute exact match on the new base
    beat_zero_shot: bool  # must beat the new base without any adapter
    on_fail: str  # retune or flag
    retune_steps: int = defaults.RETUNE_STEPS
    retune_p_c: float = defaults.P_C  # re-tuning is Trans-PEFT again, so the adapter stays transferable
    retune_p_i: float = defaults.P_I


@dataclass(frozen=True)
class Nightly:
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    tolerance: float = 0.02  # an exact match this far below the registry's baseline is a regression


@dataclass(frozen=True)
class Fanout:
    """Where per-adapter tasks run: threads in the flow's process, or a Dask cluster."""

    task_runner: str = "threads"  # threads or dask
    max_workers: int = 2  # threads, or local Dask worker processes
    dask_address: str | None = None  # an existing cluster (tcp://host:8786); None: a local one


@dataclass(frozen=True)
class Params:
    prepare: Prepare
    bases: Bases
    train: Train
    transfer: dict
    report: dict
    gate: Gate
    tracking: dict
    nightly: Nightly = Nightly()
    fanout: Fanout = Fanout()
    study: StudyConfig | None = None
    placement: Placement = Placement()


def _build(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: {where} must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ParamsError(f"params.yaml: unknown key {where}.{sorted(unknown)[0]} (known: {', '.join(sorted(known))})")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except (TypeError, ValueError) as e:
        raise ParamsError(f"params.yaml: {where}: {e}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root, where params.yaml lives") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    missing = [k for k in ("prepare", "bases", "train", "gate") if k not in raw]
    if missing:
        raise ParamsError(f"{path}: missing top-level key {missing[0]}")

    train_raw = dict(raw["train"])
    runs = {name: _build(Run, spec, f"train.runs.{name}") for name, spec in (train_raw.pop("runs", None) or {}).items()}
    if not runs:
        raise ParamsError("params.yaml: train.runs is empty; name at least one run, e.g. plain-v1: {base: v1}")
    method = _build(MethodConfig, train_raw.pop("method", {}), "train.method")
    train = _build(Train, {**train_raw, "method": method, "runs": runs}, "train")
    bases = _build(Bases, raw["bases"], "bases")
    for name, run in runs.items():
        if run.base not in bases.versions:
            raise ParamsError(f"params.yaml: train.runs.{name}.base {run.base!r} is not in bases.versions")
        try:
            train.config(name)
        except ValueError as e:
            raise ParamsError(f"params.yaml: train.runs.{name}: {e}") from None
    gate = _build(Gate, raw["gate"], "gate")
    if gate.on_fail not in ("retune", "flag"):
        raise ParamsError(f"params.yaml: gate.on_fail must be retune or flag, got {gate.on_fail!r}")
    if not 0 <= gate.retune_p_c < 1 or not 0 <= gate.retune_p_i < 1:
        raise ParamsError("params.yaml: gate.retune_p_c and gate.retune_p_i must be in [0, 1)")
    fanout = _build(Fanout, raw.get("fanout") or {}, "fanout")
    if fanout.task_runner not in ("threads", "dask"):
        raise ParamsError(f"params.yaml: fanout.task_runner must be threads or dask, got {fanout.task_runner!r}")
    if fanout.max_workers < 1:
        raise ParamsError(f"params.yaml: fanout.max_workers must be >= 1, got {fanout.max_workers}")
    study = _study(raw["study"], bases) if raw.get("study") else None
    nightly = _build(Nightly, raw.get("nightly") or {}, "nightly")
    if len(nightly.cron.split()) != 5:
        raise ParamsError(f"params.yaml: nightly.cron must be a 5-field cron expression, got {nightly.cron!r}")
    return Params(prepare=_build(Prepare, raw["prepare"], "prepare"), bases=bases, train=train,
                  transfer=raw.get("transfer") or {}, report=raw.get("report") or {}, gate=gate,
                  tracking=raw.get("tracking") or {}, nightly=nightly, fanout=fanout, study=study,
                  placement=_build(Placement, raw.get("placement") or {}, "placement"))


def _study(raw: dict, bases: Bases) -> StudyConfig:
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml: study must be a mapping")
    targets = raw.get("targets")
    if isinstance(targets, dict):  # name -> module list, or null for all linear layers
        raw = {**raw, "targets": {k: tuple(v) if v else None for k, v in targets.items()}}
    if isinstance(raw.get("grid"), list):
        raw = {**raw, "grid": tuple(tuple(cell) if isinstance(cell, list) else cell for cell in raw["grid"])}
    study = _build(StudyConfig, raw, "study")
    unknown = sorted({v for pair in study.pairs for v in pair} - set(bases.versions))
    if unknown:
        raise ParamsError(f"params.yaml: study.updates names {', '.join(unknown)}, not in bases.versions")
    return study


def lookup(params: Params, dotted: str):
    """The value at a dotted key, e.g. ``nightly.cron``."""
    value = params
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        if value is None:
            raise ParamsError(f"params.yaml has no value at {dotted}")
    return value


if __name__ == "__main__":  # python -m transpeft.params nightly.cron   (prefect.yaml reads its schedule so)
    import sys

    try:
        print(lookup(load_params(), sys.argv[1]))
    except (IndexError, ParamsError) as e:
        sys.exit(f"usage: python -m transpeft.params <dotted.key>: {e}")
