"""Revalidation: what happens to each adapter of a family when a new base version arrives.

One lifecycle, whoever starts it (the flow transfer-on-base-update, its nightly reconciler, or
``transpeft transfer --track``):

    plan (or plan_folders)   which adapters to carry over, each with its scores on the old base
    open_revalidation        the MLflow parent run
    revalidate               one adapter put on the new base and judged: an ``Outcome``
    record_outcome           its child run and its registry version on the new base
    close_revalidation       counts, reports and the base marked revalidated: a ``Summary``

``plan`` asks the registry (each adapter from the latest earlier base it serves on);
``plan_folders`` takes adapter folders as they are. ``judge`` is the gate of params.yaml, on every
task of the adapter:

    retention   new exact match / exact match on the old base      >= gate.min_retention
    score       new exact match                                    >= gate.min_score
    zero-shot   new exact match > the new base's own, no adapter      (when gate.beat_zero_shot)

An adapter that passes as transferred is served on the new base as it is. One that fails is
carried over by the gate's next strategy (``gate.strategies``, transpeft/strategies.py: scaled,
distill, retune), each judged in turn, until one passes; one that none carries is flagged. Decisions:
passed, scaled, distilled, retuned, flagged (kept unserved, also when a re-tune diverged), failed
(could not be evaluated: incompatible base, unreadable files, missing data).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .adapters import AdapterFileError, Manifest, read_manifest
from .bases import BaseInfo
from .data import DataError, Example, Task, load_tasks
from .evaluate import evaluate
from .params import Gate
from .placement import placed
from .report import registry_matrix, write_decisions, write_report
from .tracking import AdapterRecord, BaseRecord, NotRegistered, Registry, adapter_name
from .strategies import STRATEGIES, Means, describe_used, direct, split_eval, verdict
from .transfer import IncompatibleBase

DECISIONS = ("passed", "scaled", "distilled", "retuned", "flagged", "failed")
CARRIED_BY = {"direct": "passed", "scaled": "scaled", "distill": "distilled", "retune": "retuned"}  # its decision
SERVABLE = ("trained", "transferred", "scaled", "distilled", "retuned")  # statuses to carry over from


@dataclass(frozen=True)
class Candidate:
    """An adapter to carry over to the new base: where it comes from and what it scored there."""

    name: str
    source_version: str  # the base version it is carried over from
    old: dict[str, float]  # exact match per task on that base
    record: AdapterRecord | None = None  # the registry version holding its files (None: a local folder)
    manifest: Manifest | None = None  # the folder's, when already read
    source_base: BaseRecord | BaseInfo | None = None  # the base it is carried over from: distill's teacher

    @classmethod
    def registered(cls, record: AdapterRecord, source_base: BaseRecord | None = None) -> Candidate:
        return cls(record.name, record.base_version, dict(record.metrics), record, source_base=source_base)


@dataclass(frozen=True)
class Plan:
    target: BaseRecord
    candidates: list[Candidate]
    done: list[str]  # adapters that already have a version on the target: left as they are


def plan(registry: Registry, family: str, version: str) -> Plan:
    """Every adapter served on an earlier version of ``family`` and not yet on ``version``. A version on
    ``version`` whose registration was cut short before its alias is finished here, not carried again."""
    try:
        target = registry.base(family, version)
    except NotRegistered:  # created straight in MLflow: load it from its source tag and make it ready
        target = registry.adopt_base(family, version)
    bases = {b.version: b for b in registry.bases(family)}
    order = list(bases)
    earlier = order[:order.index(version)]
    candidates, done = [], []
    for name, records in sorted(registry.adapters().items()):
        mine = [r for r in records if r.base_family == family]
        there = [r for r in mine if r.base_version == version]
        if there:
            if not any(r.serving for r in there) and any(r.half_registered for r in there):
                registry.serve(next(r for r in there if r.half_registered))  # killed between version and alias
            done.append(name)
            continue
        servable = [r for r in mine if r.serving and r.status in SERVABLE and r.base_version in earlier]
        if servable:
            latest = max(servable, key=lambda r: earlier.index(r.base_version))
            candidates.append(Candidate.registered(latest, bases[latest.base_version]))
    return Plan(target, candidates, done)


def plan_folders(target: BaseRecord | BaseInfo, folders: list[Path],
                 old: dict[str, dict[str, float]] | None = None, source: BaseInfo | None = None) -> Plan:
    """Adapter folders to carry over to ``target`` as they are. ``old``: each folder's exact match per
    task on the old base when measured; else what its manifest recorded at training. ``source``: the
    old base, when known. A folder whose manifest cannot be read is still planned: ``revalidate``
    reports it as failed."""
    candidates = []
    for folder in folders:
        try:
            manifest = read_manifest(folder)
        except AdapterFileError:
            candidates.append(Candidate(adapter_name(folder), "", {}))
            continue
        recorded = {t: m["exact_match"] for t, m in manifest.metrics.items()}
        candidates.append(Candidate(adapter_name(folder), manifest.base.version,
                                    (old or {}).get(str(folder), recorded), manifest=manifest, source_base=source))
    return Plan(target, candidates, [])


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
    failure: str = ""  # when failed: incompatible (the base), bad input (files, data) or crashed
    old: dict[str, float] = field(default_factory=dict)  # exact match per task on the old base (registry)
    new: dict[str, float] = field(default_factory=dict)  # on the new base, as transferred
    zero_shot: dict[str, float] = field(default_factory=dict)  # the new base without an adapter
    retuned: dict[str, float] | None = None  # when a strategy made it anew (scaled, distilled, re-tuned): its scores
    strategy: str = ""  # the one that carried it past the gate: direct, scaled, distill or retune ("" if none did)
    attempts: list[dict] = field(default_factory=list)  # each strategy tried, in order: Attempt.as_dict
    adapter_dir: str | None = None  # the files to register on the new base (None when failed)
    seconds: dict[str, float] = field(default_factory=dict)  # evaluate, retune
    placement: str = ""  # where the base ran, e.g. "cuda:0 bfloat16"
    model_version: str | None = None  # its registry version on the new base, once recorded
    manifest: Manifest | None = None  # adapter_dir's, read once and handed on to the registry
    # The registry version whose files adapter_dir holds unchanged (passed or flagged as carried over):
    # the new version names those files instead of a copy of them.
    carried: AdapterRecord | None = None

    @property
    def winner(self) -> dict | None:
        """The attempt that carried it past the gate, if one did."""
        return next((a for a in self.attempts if a["passed"]), None)

    @property
    def labels(self) -> str:
        """Whether what serves used the task's labels: yes, no, or - when nothing serves."""
        return "-" if self.winner is None else "yes" if self.winner["used"].get("labels") else "no"

    def line(self) -> str:
        """One line per adapter for the flow's log: its decision, each strategy tried with its mean exact
        match (%) and whether it passed, and whether what serves needed labels; e.g. ``add-plain-v1:
        distilled (direct 0.0 ✗, scaled 1.5 ✗, distill 91.0 ✓), labels: no``."""
        tried = ", ".join(f"{a['strategy']} " + (verdict(sum(a["scores"].values()) / len(a["scores"]), a["passed"])
                                                 if a["scores"] else "n/a") for a in self.attempts)
        return f"{self.adapter}: {self.decision}" + (f" ({tried}), labels: {self.labels}" if tried else
                                                    f": {'; '.join(self.reasons)[:200]}")

    @property
    def served_scores(self) -> dict[str, float]:
        return self.retuned if self.retuned is not None else self.new

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("manifest", "carried")}

    @classmethod
    def crashed(cls, candidate: Candidate, error: str) -> Outcome:
        """An adapter whose judging raised even after its retries: failed, left for the reconciler."""
        return cls(candidate.name, candidate.source_version, "failed", reasons=[f"crashed: {error}"],
                   failure="crashed", old=dict(candidate.old))


_zero_shot: dict[tuple[str, int], float] = {}
_zero_shot_lock = threading.Lock()


def zero_shot(model, tokenizer, base: BaseInfo, tasks: list[Task], rows: dict[str, list[Example]],
              batch_size: int = 32) -> dict[str, float]:
    """The base's own exact match on each task's ``rows`` (no adapter), computed once per base and rows."""
    scores = {}
    for task in tasks:
        key = (base.fingerprint, hash(tuple(rows[task.name])))  # all eval rows, or the gate's share of them
        with _zero_shot_lock:
            cached = _zero_shot.get(key)
        if cached is None:
            cached = evaluate(model, tokenizer, rows[task.name], batch_size).exact_match
            with _zero_shot_lock:
                _zero_shot[key] = cached
        scores[task.name] = cached
    return scores


def revalidate(slot, adapter_dir: Path, candidate: Candidate, data_dir: Path, gate: Gate, workdir: Path,
               batch_size: int = 32, progress: bool = False, teacher=None) -> Outcome:
    """Transfer one adapter onto the base lent in ``slot`` (model, tokenizer, info) and judge it; while it
    fails, try the gate's next strategy (transpeft/strategies.py), and flag it when none carries it.
    ``teacher()``: lends the old base, for distill. ``slot.model`` is the bare base again afterwards.

    The adapter as transferred is always measured first (``Outcome.new``, and the check that it fits
    the base), and is served as it is only when ``direct`` is among the strategies."""
    outcome = Outcome(candidate.name, candidate.source_version, "failed", old=dict(candidate.old),
                      carried=candidate.record)  # its files, unless a strategy makes new ones
    target = slot.info
    outcome.placement = placed(slot.model)
    try:
        manifest = candidate.manifest or read_manifest(adapter_dir)
        tasks = load_tasks(data_dir, list(manifest.tasks))
        held_out, gate_rows = {}, {t.name: list(t.eval) for t in tasks}
        if "scaled" in gate.strategies:  # its alpha is picked on rows the gate then never scores
            for task in tasks:
                held_out[task.name], gate_rows[task.name] = split_eval(task, gate.held_out)
        means = Means(candidate.name, slot, Path(adapter_dir), manifest, tasks, gate_rows, held_out, gate,
                      Path(workdir), teacher, progress, batch_size)
        first = direct(means)
        outcome.zero_shot = zero_shot(slot.model, slot.tokenizer, target, tasks, gate_rows, batch_size)
    except IncompatibleBase as e:
        outcome.reasons = [f"incompatible with {target.family}/{target.version}: {m}" for m in e.mismatches]
        outcome.failure = "incompatible"
        return outcome
    except (AdapterFileError, DataError) as e:
        outcome.reasons, outcome.failure = [str(e)], "bad input"
        return outcome
    outcome.new = first.scores
    outcome.seconds["evaluate"] = round(first.seconds, 2)
    verdict = judge(outcome.new, outcome.old, outcome.zero_shot, gate)
    first.passed, first.reasons = verdict.passed, list(verdict.reasons)
    outcome.reasons = list(verdict.reasons)

    attempts = []
    for name in gate.strategies:
        attempt = first if name == "direct" else STRATEGIES[name](means)
        if name != "direct":
            if attempt.adapter_dir is not None:
                again = judge(attempt.scores, outcome.old, outcome.zero_shot, gate)
                attempt.passed, attempt.reasons = again.passed, list(again.reasons)
            outcome.seconds[name] = round(attempt.seconds, 2)
            outcome.reasons.append(attempt.line() + ("" if attempt.passed or not attempt.reasons
                                                     else ": " + "; ".join(attempt.reasons)))
        attempts.append(attempt)
        if attempt.passed or getattr(slot, "broken", False):  # a diverged training left the base unusable
            break
    outcome.attempts = [a.as_dict() for a in attempts]
    winner = next((a for a in attempts if a.passed), None)
    if winner is None:  # kept unserved, as transferred, with every strategy's reason
        outcome.decision, outcome.adapter_dir, outcome.manifest = "flagged", str(adapter_dir), manifest
        return outcome
    outcome.decision, outcome.strategy = CARRIED_BY[winner.strategy], winner.strategy
    outcome.adapter_dir, outcome.manifest = winner.adapter_dir, winner.manifest
    if winner.strategy != "direct":  # new files, made on this base
        outcome.retuned, outcome.carried = winner.scores, None
    return outcome


def workdir(family: str, version: str) -> tempfile.TemporaryDirectory:
    """A revalidation's scratch folder, after removing those a killed run of the same base left (their
    downloads and any half-written re-tuned adapter): one revalidation of a base runs at a time."""
    for stale in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}{family}-{version}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{family}-{version}-")


WORKDIR_PREFIX = "revalidate-"


# -- the record in MLflow -----------------------------------------------------------------------

REGISTRY_STATUS = {"passed": "transferred", "scaled": "scaled", "distilled": "distilled", "retuned": "retuned",
                   "flagged": "failed-gate"}


def open_revalidation(registry: Registry, target: BaseRecord, plan_: Plan) -> str:
    """The parent run of one revalidation; each adapter's run is its child."""
    return registry.start_run("transfer", f"update {target.family}/{target.version}", {
        "base_family": target.family, "base_version": target.version, "adapters": len(plan_.candidates),
        "already_done": ",".join(plan_.done)})


def record_outcome(registry: Registry, parent_run: str, target: BaseRecord, outcome: Outcome) -> Outcome:
    """The adapter's child run and, unless it failed, its registry version on the new base: served
    when it passed or was re-tuned, kept unserved (status failed-gate) when flagged. Returns the
    outcome with that version. A version carried over unchanged names the files of the version it
    came from (the same bytes, their checksum checked on every load) instead of a copy: an update of
    the fleet stores only re-tuned adapters. Its tag revalidation_run names the child run."""
    # A retried record task finds the child run of its first attempt: one per adapter and revalidation.
    child, existed = registry.child_run("transfer", f"{outcome.adapter} -> {target.family}/{target.version}", {
        "adapter": outcome.adapter, "base_version": target.version, "source_version": outcome.source_version,
        "decision": outcome.decision, "placement": outcome.placement}, parent_run, key="adapter")
    metrics = {f"{kind}.{task}": value for kind, values in (
        ("old_exact_match", outcome.old), ("exact_match", outcome.new), ("zero_shot", outcome.zero_shot),
        ("retuned_exact_match", outcome.retuned or {})) for task, value in values.items()}
    metrics |= {f"seconds.{step}": s for step, s in outcome.seconds.items()}
    metrics |= {f"{a['strategy']}_exact_match.{task}": v
                for a in outcome.attempts[1:] for task, v in a["scores"].items()}
    metrics |= {f"steps.{a['strategy']}": a["steps"] for a in outcome.attempts if a["steps"]}
    tags = {"reasons": "; ".join(outcome.reasons)[:5000], "strategy": outcome.strategy or "none",
            "attempts": json.dumps([{k: v for k, v in a.items() if k != "seconds"} for a in outcome.attempts])[:5000]}
    if existed and registry.run(child).data.metrics:  # metrics are history: logged once
        metrics = {}
    registry.log(child, metrics=metrics, tags=tags)
    if outcome.decision == "failed":
        registry.finish_run(child, ok=False)
        return outcome
    if outcome.carried is not None:  # the files it was carried over with: named where they are, not copied
        files_run, files = outcome.carried.run_id, outcome.carried.files
    else:
        registry.log_files(child, outcome.adapter_dir, "adapter")
        files_run, files = child, None
    record = registry.register_adapter(
        outcome.adapter, Path(outcome.adapter_dir), target, REGISTRY_STATUS[outcome.decision],
        {t: {"exact_match": v} for t, v in outcome.served_scores.items()}, files_run,
        transferred_from=outcome.source_version, serve=outcome.decision != "flagged", manifest=outcome.manifest,
        files=files, tags={"gate": "passed" if outcome.decision == "passed" else "; ".join(outcome.reasons)[:5000],
                           "revalidation_run": child, **carried_with(outcome)})
    registry.finish_run(child)
    return replace(outcome, model_version=record.model_version)


def carried_with(outcome: Outcome) -> dict[str, str]:
    """The registry version's tags saying which strategy carried it, what that used and its steps."""
    winner = outcome.winner
    if winner is None:
        return {"strategy": "none"}
    return {"strategy": winner["strategy"], "used": describe_used(winner["used"]) or "nothing",
            "labels": str(outcome.labels == "yes").lower(),
            "strategy_steps": str(winner["steps"])}  # its seconds are the child run's metrics: tags stay reproducible


@dataclass(frozen=True)
class Summary:
    """One revalidation at a glance: how many adapters ended how, and where its record is."""

    base: str  # family/version
    state: str  # done; done with failures (an adapter flagged or failed); incomplete (one crashed: run again)
    run_id: str  # the MLflow parent run
    passed: int
    scaled: int
    distilled: int
    retuned: int
    flagged: int
    failed: int
    already_done: int

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        others = "".join(f"{n} {what}, " for n, what in ((self.scaled, "scaled"), (self.distilled, "distilled")) if n)
        return (f"{self.base} {self.state}: {self.passed} passed, {others}{self.retuned} re-tuned, "
                f"{self.flagged + self.failed} failed "
                f"({self.flagged} flagged, {self.failed} could not be evaluated), {self.already_done} already "
                f"there; MLflow run {self.run_id}")

    def markdown(self, outcomes: list[Outcome]) -> str:
        """The gate's decisions, for the flow run's artifact in the Prefect UI."""
        lines = [f"# Revalidation of {self.base}: {self.state}", "",
                 f"passed {self.passed}, scaled {self.scaled}, distilled {self.distilled}, re-tuned {self.retuned}, "
                 f"flagged {self.flagged}, failed {self.failed}, already there {self.already_done} "
                 f"(MLflow run {self.run_id})",
                 "", "| adapter | from | decision | carried by | labels | why |", "|---|---|---|---|---|---|"]
        lines += [f"| {o.adapter} | {o.source_version} | {o.decision} | {o.strategy or '-'} | {o.labels} | "
                  f"{'; '.join(o.reasons) or '-'} |" for o in sorted(outcomes, key=lambda o: o.adapter)]
        return "\n".join(lines)


def close_revalidation(registry: Registry, parent_run: str, target: BaseRecord, plan_: Plan,
                       outcomes: list[Outcome], crashed: list[str], whole_family: bool = True) -> Summary:
    """Counts, the transfer report and the gate decisions on the parent run. When the plan was the
    family's (``whole_family``), the base version is marked with the revalidation's state: done, done
    with failures when an adapter was flagged or could not be evaluated, or incomplete when one crashed
    (the nightly reconciler runs it again). A hand-picked set of folders marks nothing."""
    counts = {d: sum(o.decision == d for o in outcomes) for d in DECISIONS} | {"already_done": len(plan_.done)}
    title = f"{target.family}/{target.version}"
    with tempfile.TemporaryDirectory() as tmp:
        write_report(registry_matrix(registry.adapters()), Path(tmp), f"Transfer report: {target.family} up to "
                                                                      f"{target.version}")
        write_decisions(outcomes, Path(tmp), f"Gate decisions on {title}")
        registry.log_files(parent_run, tmp, "report")
    state = "incomplete" if crashed else "done with failures" if counts["flagged"] + counts["failed"] else "done"
    registry.log(parent_run, metrics={f"adapters.{k}": v for k, v in counts.items()},
                 tags={"crashed": ",".join(crashed), "state": state})
    if whole_family:
        registry.mark_revalidation(target.family, target.version, state, parent_run)
    registry.finish_run(parent_run, ok=not crashed)
    return Summary(title, state, parent_run, **counts)
