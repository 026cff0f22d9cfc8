"""params.yaml as typed, validated objects: configuration enters once, here.

Each top-level key belongs to one dvc.yaml stage of the same name (prepare, bases, train, transfer,
report) or to the Prefect side (gate, nightly, fanout, tracking); ``placement`` (device and dtype)
to every stage and flow that runs a model. A bad value fails on load with the key's
path, e.g. ``params.yaml: train.runs.transpeft-v1.p_c must be in [0, 1), got 1.5``. The models are
``transpeft.config``'s: the same as the library's and the command line's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic_core import ArgsKwargs
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from . import defaults
from .config import (Count, Invalid, MethodConfig, PositiveReal, Probability, Real, StudyConfig, TrainConfig, config,
                     describe, nonempty, rule)
from .placement import Placement

# The DVC pipeline's layout under the project root: what dvc.yaml's stages write (transpeft/stages/).
PIPELINE = Path("pipeline")
DATA, BASES, ADAPTERS, METRICS, REPORT = (PIPELINE / name for name in ("data", "bases", "adapters", "metrics", "report"))


class ParamsError(ValueError):
    """params.yaml is missing a key or holds a bad value; the message names the key."""


@config
class Prepare:
    tasks: dict[str, str]  # task name -> source: the demo generator's path, or a task folder
    seed: int = 0
    n_train: int = 2000
    n_eval: int = 200


@config
class Bases:
    family: str
    versions: tuple[str, ...]  # oldest first
    profile: str = "demo"  # the self-built demo family: demo, or test (seconds)
    sources: dict[str, str] = Field(default_factory=dict)  # real bases: version -> directory or hub id[@revision]

    @property
    def is_demo(self) -> bool:
        return not self.sources

    def ref(self, version: str):
        """Where the stages and flows load base ``version`` from (a ``transpeft.bases.BaseRef``)."""
        from .bases import BaseRef  # torch and transformers: only where a base is to be loaded

        if self.is_demo:
            return BaseRef(str(BASES / version), family=self.family, version=version)
        source, _, revision = str(self.sources[version]).partition("@")
        return BaseRef(source, revision or None, family=self.family, version=version)


@config
class Run:
    """One training configuration of the grid: which base, which regularisers."""

    base: str
    p_c: Probability = 0.0
    p_i: Probability = 0.0


@config
class Train:
    tasks: tuple[str, ...]
    schedule: TrainConfig  # every TrainConfig field but p_c and p_i, which each run sets
    runs: Annotated[dict[str, Run], nonempty("name at least one run, e.g. plain-v1: {base: v1}")]
    method: MethodConfig = MethodConfig()

    @field_validator("schedule", mode="before")
    @classmethod
    def _no_regularisers(cls, schedule):
        for name in ("p_c", "p_i"):
            if isinstance(schedule, dict) and name in schedule:
                raise Invalid(f"may not set {name}: each run sets its own, under train.runs")
        return schedule

    def config(self, run: str) -> TrainConfig:
        spec = self.runs[run]
        return replace(self.schedule, p_c=spec.p_c, p_i=spec.p_i)


# Ways to carry an adapter over, in transpeft/strategies.py; named here so params.yaml loads without torch.
Strategy = Literal["direct", "scaled", "distill", "retune"]


@config
class Gate:
    # The defaults are the shipped params.yaml's; `transpeft transfer` outside a project judges by them.
    min_retention: Real = 0.8  # new-base metric / old-base metric
    min_score: Real = 0.5  # absolute exact match on the new base
    beat_zero_shot: bool = True  # must beat the new base without any adapter
    # Tried in this order until one carries the adapter past the gate; one that none carries is flagged.
    strategies: Annotated[tuple[Strategy, ...], nonempty("list at least direct")] = (
        "direct", "scaled", "distill", "retune")
    retune_steps: Count = defaults.RETUNE_STEPS
    retune_p_c: Probability = defaults.P_C  # re-tuning is Trans-PEFT again, so the adapter stays transferable
    retune_p_i: Probability = defaults.P_I
    # scaled: the share of each task's eval rows kept from the gate to pick alpha on, and the alphas tried
    held_out: Annotated[Real, rule("in (0, 1)", lambda x: 0 < x < 1)] = 0.25
    alphas: Annotated[tuple[PositiveReal, ...], nonempty("list the scales to try, e.g. [0.5, 1.5]")] = (
        0.25, 0.5, 0.75, 1.25, 1.5, 2.0)
    # distill: optimizer steps, where its prompts come from, how many per task, and seed rows for synthetic ones
    distill_steps: Count = defaults.RETUNE_STEPS
    prompts: Literal["stored", "synthetic"] = "stored"
    prompts_per_task: Count = 256
    seed_examples: Annotated[int, rule("in [1, 8]", lambda n: 1 <= n <= 8)] = 8

    @model_validator(mode="before")
    @classmethod
    def _on_fail_is_gone(cls, values):
        given = values.kwargs or {} if isinstance(values, ArgsKwargs) else values  # a dataclass's arguments
        if isinstance(given, dict) and "on_fail" in given:
            raise Invalid("on_fail is now strategies, the ways tried in order: on_fail: retune is "
                          "strategies: [direct, retune], on_fail: flag is strategies: [direct]")
        return values


@config
class Nightly:
    cron: Annotated[str, rule("a 5-field cron expression", lambda cron: len(cron.split()) == 5)] = "0 2 * * *"
    timezone: str = "UTC"
    tolerance: Real = 0.02  # an exact match this far below the registry's baseline is a regression


@config
class Fanout:
    """Where per-adapter tasks run: threads in the flow's process, or a Dask cluster."""

    task_runner: Literal["threads", "dask"] = "threads"
    max_workers: Count = 2  # threads, or local Dask worker processes
    dask_address: str | None = None  # an existing cluster (tcp://host:8786); None: a local one


@config
class Params:
    prepare: Prepare
    bases: Bases
    train: Train
    gate: Gate
    transfer: dict = Field(default_factory=dict)
    report: dict = Field(default_factory=dict)
    tracking: dict = Field(default_factory=dict)
    nightly: Nightly = Nightly()
    fanout: Fanout = Fanout()
    study: StudyConfig | None = None
    placement: Placement = Placement()

    def __post_init__(self):  # what one section alone cannot check
        for name, run in self.train.runs.items():
            if run.base not in self.bases.versions:
                raise ValueError(f"train.runs.{name}.base {run.base!r} is not in bases.versions")
        named = {v for pair in self.study.pairs for v in pair} if self.study else set()
        unknown = sorted(named - set(self.bases.versions))
        if unknown:
            raise ValueError(f"study.updates names {', '.join(unknown)}, not in bases.versions")


_PARAMS = TypeAdapter(Params)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root, where params.yaml lives") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of keys (prepare, bases, ...), got {type(raw).__name__}")
    try:  # a key left empty (nightly:) takes its defaults
        return _PARAMS.validate_python({key: value for key, value in raw.items() if value is not None})
    except ValidationError as e:
        raise ParamsError("\n".join(f"{path}: {line}" for line in describe(e, Params))) from None


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
