"""Revalidation: what happens to each adapter of a family when a new base version arrives.

``plan`` asks the registry which adapters to carry over (each from the latest earlier base it serves
on); ``revalidate`` puts one adapter on the new base and judges it; ``judge`` is the gate of
params.yaml, on every task of the adapter:

    retention   new exact match / exact match on the old base      >= gate.min_retention
    score       new exact match                                    >= gate.min_score
    zero-shot   new exact match > the new base's own, no adapter      (when gate.beat_zero_shot)

A passing adapter is served on the new base as it is. A failing one is re-tuned (warm start from
its transferred weights, Trans-PEFT again, ``gate.retune_steps`` steps) and judged again, or
flagged, as ``gate.on_fail`` says. Decisions: passed, retuned, flagged, failed (could not be
evaluated: incompatible base, unreadable files, missing data, diverged re-tuning).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .adapters import AdapterFileError, read_manifest
from .bases import BaseInfo
from .data import DataError, Task, load_tasks
from .evaluate import evaluate
from .params import Gate
from .placement import placed
from .tracking import AdapterRecord, BaseRecord, NotRegistered, Registry
from .train import TrainConfig, TrainingDiverged, train_adapter
from .transfer import IncompatibleBase, load_adapter, unload_adapter

DECISIONS = ("passed", "retuned", "flagged", "failed")
SERVABLE = ("trained", "transferred", "retuned")  # registry statuses an adapter can be carried over from


@dataclass(frozen=True)
class Candidate:
    """An adapter to carry over to the new base, and the registered version it comes from."""

    name: str
    source: AdapterRecord


@dataclass(frozen=True)
class Plan:
    target: BaseRecord
    candidates: list[Candidate]
    done: list[str]  # adapters that already have a version on the target: left as they are


def plan(registry: Registry, family: str, version: str) -> Plan:
    """Every adapter served on an earlier version of ``family`` and not yet on ``version``."""
    try:
        target = registry.base(family, version)
    except NotRegistered:  # created straight in MLflow: load it from its source tag and make it ready
        target = registry.adopt_base(family, version)
    order = [b.version for b in registry.bases(family)]
    earlier = order[:order.index(version)]
    candidates, done = [], []
    for name, records in sorted(registry.adapters().items()):
        mine = [r for r in records if r.base_family == family]
        if any(r.base_version == version for r in mine):
            done.append(name)
            continue
        servable = [r for r in mine if r.serving and r.status in SERVABLE and r.base_version in earlier]
        if servable:
            candidates.append(Candidate(name, max(servable, key=lambda r: earlier.index(r.base_version))))
    return Plan(target, candidates, done)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]  # why it failed, one per broken rule and task


def judge(new: dict[str, float], old: dict[str, float], zero_shot: dict[str, float], gate: Gate) -> Verdict:
    """The gate on per-task exact match: new base with the adapter, old base with it, new base without."""
    reasons = []
    for task, score in sorted(new.items()):
        baseline = old.get(task)
        if baseline and score / baseline < gate.min_retention:
            reasons.append(f"{task}: retention {score / baseline:.2f} < {gate.min_retention} "
                           f"({score:.3f} vs {baseline:.3f} on the old base)")
        if score < gate.min_score:
            reasons.append(f"{task}: exact match {score:.3f} < {gate.min_score}")
        if gate.beat_zero_shot and score <= zero_shot.get(task, 0.0):
            reasons.append(f"{task}: {score:.3f} does not beat the new base's zero-shot {zero_shot[task]:.3f}")
    return Verdict(not reasons, tuple(reasons))


@dataclass
class Outcome:
    """One adapter's revalidation on a new base: what was measured and decided."""

    adapter: str
    source_version: str  # the base version it was carried over from
    decision: str  # one of DECISIONS
    reasons: list[str] = field(default_factory=list)
    old: dict[str, float] = field(default_factory=dict)  # exact match per task on the old base (registry)
    new: dict[str, float] = field(default_factory=dict)  # on the new base, as transferred
    zero_shot: dict[str, float] = field(default_factory=dict)  # the new base without an adapter
    retuned: dict[str, float] | None = None  # after re-tuning, when it was re-tuned
    adapter_dir: str | None = None  # the files to register on the new base (None when failed)
    seconds: dict[str, float] = field(default_factory=dict)  # evaluate, retune
    placement: str = ""  # where the base ran, e.g. "cuda:0 bfloat16"
    model_version: str | None = None  # its registry version on the new base, once recorded

    @property
    def served_scores(self) -> dict[str, float]:
        return self.retuned if self.retuned is not None else self.new

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def crashed(cls, candidate: Candidate, error: str) -> Outcome:
        """An adapter whose judging raised even after its retries: failed, left for the reconciler."""
        return cls(candidate.name, candidate.source.base_version, "failed", reasons=[f"crashed: {error}"])


_zero_shot: dict[tuple[str, str], float] = {}
_zero_shot_lock = threading.Lock()


def zero_shot(model, tokenizer, base: BaseInfo, tasks: list[Task], batch_size: int = 32) -> dict[str, float]:
    """The base's own exact match on each task (no adapter), computed once per base and task."""
    scores = {}
    for task in tasks:
        key = (base.fingerprint, task.content_hash)
        with _zero_shot_lock:
            cached = _zero_shot.get(key)
        if cached is None:
            cached = evaluate(model, tokenizer, list(task.eval), batch_size).exact_match
            with _zero_shot_lock:
                _zero_shot[key] = cached
        scores[task.name] = cached
    return scores


def _scores(model, tokenizer, tasks: list[Task], batch_size: int) -> dict[str, float]:
    return {t.name: evaluate(model, tokenizer, list(t.eval), batch_size).exact_match for t in tasks}


def retune_config(training: dict, gate: Gate) -> TrainConfig:
    """The adapter's own schedule, cut to the re-tuning budget, with Trans-PEFT's regularisers on."""
    kept = {f.name: training[f.name] for f in fields(TrainConfig) if f.name in training}
    return TrainConfig(**{**kept, "steps": gate.retune_steps, "p_c": gate.retune_p_c, "p_i": gate.retune_p_i})


def revalidate(slot, adapter_dir: Path, candidate: Candidate, data_dir: Path, gate: Gate, workdir: Path,
               batch_size: int = 32, progress: bool = False) -> Outcome:
    """Transfer one adapter onto the base lent in ``slot`` (model, tokenizer, info), judge it, and
    re-tune or flag it as the gate says. ``slot.model`` is the bare base again afterwards."""
    outcome = Outcome(candidate.name, candidate.source.base_version, "failed", old=dict(candidate.source.metrics))
    target = slot.info
    outcome.placement = placed(slot.model)
    started = time.perf_counter()
    try:
        manifest = read_manifest(adapter_dir)
        tasks = load_tasks(data_dir, list(manifest.tasks))
        outcome.zero_shot = zero_shot(slot.model, slot.tokenizer, target, tasks, batch_size)
        adapted = load_adapter(slot.model, target, adapter_dir)
        try:
            outcome.new = _scores(adapted, slot.tokenizer, tasks, batch_size)
        finally:
            slot.model = unload_adapter(adapted, manifest.method.name)
    except IncompatibleBase as e:
        outcome.reasons = [f"incompatible with {target.family}/{target.version}: {m}" for m in e.mismatches]
        return outcome
    except (AdapterFileError, DataError) as e:
        outcome.reasons = [str(e)]
        return outcome
    outcome.seconds["evaluate"] = round(time.perf_counter() - started, 2)

    verdict = judge(outcome.new, outcome.old, outcome.zero_shot, gate)
    outcome.reasons = list(verdict.reasons)
    if verdict.passed:
        outcome.decision, outcome.adapter_dir = "passed", str(adapter_dir)
        return outcome
    if gate.on_fail == "flag":
        outcome.decision, outcome.adapter_dir = "flagged", str(adapter_dir)
        return outcome

    started = time.perf_counter()
    out = Path(workdir) / f"{candidate.name}-retuned"
    try:
        adapted, _, _ = train_adapter(slot.model, slot.tokenizer, target, tasks, manifest.method,
                                      retune_config(manifest.training, gate), out, progress=progress,
                                      warm_start=adapter_dir)
    except TrainingDiverged as e:
        outcome.reasons.append(f"re-tuning diverged: {e}")
        slot.broken = True  # it still carries the half-trained adapter: the lender drops it
        return outcome
    slot.model = unload_adapter(adapted, manifest.method.name)
    outcome.seconds["retune"] = round(time.perf_counter() - started, 2)
    outcome.retuned = {t: m["exact_match"] for t, m in read_manifest(out).metrics.items()}
    again = judge(outcome.retuned, outcome.old, outcome.zero_shot, gate)
    if again.passed:
        outcome.decision, outcome.adapter_dir = "retuned", str(out)
        outcome.reasons.append(f"re-tuned for {gate.retune_steps} steps: passes")
    else:
        outcome.decision, outcome.adapter_dir = "flagged", str(adapter_dir)
        outcome.reasons.append(f"re-tuned for {gate.retune_steps} steps, still failing: " + "; ".join(again.reasons))
    return outcome


# -- the record in MLflow -----------------------------------------------------------------------

REGISTRY_STATUS = {"passed": "transferred", "retuned": "retuned", "flagged": "failed-gate"}


def open_revalidation(registry: Registry, target: BaseRecord, plan_: Plan) -> str:
    """The parent run of one revalidation; each adapter's run is its child."""
    return registry.start_run("transfer", f"update {target.family}/{target.version}", {
        "base_family": target.family, "base_version": target.version, "adapters": len(plan_.candidates),
        "already_done": ",".join(plan_.done)})


def record_outcome(registry: Registry, parent_run: str, target: BaseRecord, outcome: Outcome) -> AdapterRecord | None:
    """The adapter's child run and, unless it failed, its registry version on the new base: served
    when it passed or was re-tuned, kept unserved (status failed-gate) when flagged."""
    child = registry.start_run("transfer", f"{outcome.adapter} -> {target.family}/{target.version}", {
        "adapter": outcome.adapter, "base_version": target.version, "source_version": outcome.source_version,
        "decision": outcome.decision, "placement": outcome.placement}, parent_run_id=parent_run)
    metrics = {f"{kind}.{task}": value for kind, values in (
        ("old_exact_match", outcome.old), ("exact_match", outcome.new), ("zero_shot", outcome.zero_shot),
        ("retuned_exact_match", outcome.retuned or {})) for task, value in values.items()}
    metrics |= {f"seconds.{step}": s for step, s in outcome.seconds.items()}
    registry.log(child, metrics=metrics, tags={"reasons": "; ".join(outcome.reasons)[:5000]})
    if outcome.decision == "failed":
        registry.finish_run(child, ok=False)
        return None
    registry.log_files(child, outcome.adapter_dir, "adapter")
    record = registry.register_adapter(
        outcome.adapter, Path(outcome.adapter_dir), target, REGISTRY_STATUS[outcome.decision],
        {t: {"exact_match": v} for t, v in outcome.served_scores.items()}, child,
        transferred_from=outcome.source_version, serve=outcome.decision != "flagged",
        tags={"gate": "passed" if outcome.decision == "passed" else "; ".join(outcome.reasons)[:5000]})
    registry.finish_run(child)
    return record


def summary_markdown(summary: dict, outcomes: list[Outcome]) -> str:
    """The revalidation at a glance, for the flow run's artifact in the Prefect UI."""
    lines = [f"# Revalidation of {summary['base']}", "",
             f"passed {summary['passed']}, re-tuned {summary['retuned']}, flagged {summary['flagged']}, "
             f"failed {summary['failed']}, already there {summary['already_done']} (MLflow run {summary['run_id']})",
             "", "| adapter | from | decision | why |", "|---|---|---|---|"]
    lines += [f"| {o.adapter} | {o.source_version} | {o.decision} | {'; '.join(o.reasons) or '-'} |"
              for o in sorted(outcomes, key=lambda o: o.adapter)]
    return "\n".join(lines)


def close_revalidation(registry: Registry, parent_run: str, target: BaseRecord, plan_: Plan,
                       outcomes: list[Outcome], crashed: list[str]) -> dict:
    """Counts, the transfer report and the gate decisions on the parent run; the base version is
    marked revalidated unless an adapter crashed (then the nightly reconciler runs it again)."""
    import tempfile

    from .report import registry_matrix, write_decisions, write_report

    counts = {d: sum(o.decision == d for o in outcomes) for d in DECISIONS} | {"already_done": len(plan_.done)}
    title = f"{target.family}/{target.version}"
    with tempfile.TemporaryDirectory() as tmp:
        write_report(registry_matrix(registry.adapters()), Path(tmp), f"Transfer report: {target.family} up to "
                                                                      f"{target.version}")
        write_decisions(outcomes, Path(tmp), f"Gate decisions on {title}")
        registry.log_files(parent_run, tmp, "report")
    registry.log(parent_run, metrics={f"adapters.{k}": v for k, v in counts.items()},
                 tags={"crashed": ",".join(crashed)})
    state = "incomplete" if crashed else "done"
    registry.mark_revalidation(target.family, target.version, state, parent_run)
    registry.finish_run(parent_run, ok=not crashed)
    return {"base": title, "state": state, "run_id": parent_run, **counts}
