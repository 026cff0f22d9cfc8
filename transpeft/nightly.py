"""The nightly regression: every served adapter re-evaluated on its base, against its registry baseline.

A served adapter is the version an ``on-<base_version>`` alias points at. Its baseline is the exact
match recorded on that registry version; it regresses when any task scores more than
``nightly.tolerance`` below it, or when it can no longer be loaded or evaluated at all.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import AdapterFileError, read_manifest
from .data import load_tasks
from .placement import placed
from .tracking import FINISHED, AdapterRecord, BaseRecord, Registry
from .transfer import refusal, score_adapters


@dataclass(frozen=True)
class Check:
    """One served adapter re-evaluated on its base, against its registry baseline."""

    adapter: str
    base_family: str
    base_version: str
    model_version: str
    baseline: dict[str, float]  # exact match per task recorded on the registry version
    current: dict[str, float]  # tonight's
    regressions: list[str]  # one line per problem; empty when it holds
    placement: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.adapter} on {self.base_family}/{self.base_version}: {'; '.join(self.regressions)}"

    @classmethod
    def unscorable(cls, base: BaseRecord, record: AdapterRecord, error: str) -> Check:
        """An adapter whose base could not be scored at all (even after retries)."""
        return cls(record.name, base.family, base.version, record.model_version, record.metrics, {},
                   [f"cannot be evaluated: {error}"])


def unrevalidated(registry: Registry, family: str | None = None) -> list[BaseRecord]:
    """Base versions with no finished revalidation, oldest first within each family (the reconciler)."""
    return [b for b in registry.bases(family) if b.revalidation not in FINISHED]


def served(registry: Registry, family: str | None = None) -> dict[tuple[str, str], list[AdapterRecord]]:
    """(family, base version) -> the adapter versions served there."""
    by_base: dict[tuple[str, str], list[AdapterRecord]] = {}
    for records in registry.adapters().values():
        for r in records:
            if r.serving and (family is None or r.base_family == family):
                by_base.setdefault((r.base_family, r.base_version), []).append(r)
    return by_base


def regressions(baseline: dict[str, float], current: dict[str, float], tolerance: float) -> list[str]:
    """One line per task that dropped more than ``tolerance`` below its baseline, or went missing."""
    lines = []
    for task, expected in sorted(baseline.items()):
        if task not in current:
            lines.append(f"{task}: not evaluated")
        elif current[task] < expected - tolerance:
            lines.append(f"{task}: {current[task]:.3f} < baseline {expected:.3f} - {tolerance}")
    return lines


def check_served(slot, base: BaseRecord, adapters: dict[str, tuple[AdapterRecord, Path]], data_dir: str | Path,
                 tolerance: float) -> list[Check]:
    """Every adapter served on ``base`` (record and files, by name) scored on the base lent in
    ``slot`` (``score_adapters``), each against its baseline; one that cannot be loaded any more is a
    regression."""
    changed = slot.info.fingerprint != base.fingerprint
    tasks = {t.name: t for t in load_tasks(data_dir, sorted({t for r, _ in adapters.values() for t in r.metrics}))}
    started = time.perf_counter()
    jobs, scored = {}, {}
    for name, (record, files) in sorted(adapters.items()):
        try:
            jobs[name] = (files, read_manifest(files), [tasks[t] for t in record.metrics])
        except AdapterFileError as e:
            scored[name] = e
    scored |= score_adapters(slot.model, slot.tokenizer, slot.info, jobs)
    each = round((time.perf_counter() - started) / max(len(adapters), 1), 2)
    checks = []
    for name, (record, _) in sorted(adapters.items()):
        scores = scored[name]
        if isinstance(scores, Exception):
            current, lines = {}, [f"cannot be evaluated: {refusal(scores)}"]
        else:
            current = {t: m.exact_match for t, m in scores.items()}
            lines = regressions(record.metrics, current, tolerance)
        if changed:
            lines.insert(0, f"base {base.version} changed since registration (fingerprint {slot.info.fingerprint})")
        checks.append(Check(name, base.family, base.version, record.model_version, record.metrics, current, lines,
                            placed(slot.model), {"evaluate": each}))
    return checks


def record_nightly(registry: Registry, checks: list[Check], tolerance: float) -> str:
    """One run in the `nightly` experiment: every score as a metric, the regressions as an artifact."""
    run = registry.start_run("nightly", time.strftime("nightly %Y-%m-%d %H:%M"), {"tolerance": tolerance})
    metrics = {f"{c.adapter}.{c.base_version}.{task}": v for c in checks for task, v in c.current.items()}
    failing = [c for c in checks if c.regressions]
    placements = sorted({c.placement for c in checks if c.placement})
    registry.log(run, metrics={**metrics, "adapters": len(checks), "regressions": len(failing)},
                 tags={"placement": ", ".join(placements)})
    lines = ["# Nightly regressions", "", f"{len(failing)} of {len(checks)} served adapters regressed "
             f"(tolerance {tolerance}).", ""]
    lines += [f"- {c.line()}" for c in failing]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "regressions.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        registry.log_files(run, tmp, "report")
    registry.finish_run(run, ok=not failing)
    return run
