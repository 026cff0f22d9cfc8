"""The nightly regression: every served adapter re-evaluated on its base, against its registry baseline.

A served adapter is the version an ``on-<base_version>`` alias points at. Its baseline is the exact
match recorded on that registry version; it regresses when any task scores more than
``nightly.tolerance`` below it, or when it can no longer be loaded or evaluated at all.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .tracking import AdapterRecord, BaseRecord, Registry


def unrevalidated(registry: Registry, family: str | None = None) -> list[BaseRecord]:
    """Base versions with no finished revalidation, oldest first within each family (the reconciler)."""
    return [b for b in registry.bases(family) if b.revalidation != "done"]


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


def record_nightly(registry: Registry, results: list[dict], tolerance: float) -> str:
    """One run in the `nightly` experiment: every score as a metric, the regressions as an artifact."""
    run = registry.start_run("nightly", time.strftime("nightly %Y-%m-%d %H:%M"), {"tolerance": tolerance})
    metrics = {f"{r['adapter']}.{r['base_version']}.{task}": v for r in results for task, v in r["current"].items()}
    failing = [r for r in results if r["regressions"]]
    placements = sorted({r["placement"] for r in results if r.get("placement")})
    registry.log(run, metrics={**metrics, "adapters": len(results), "regressions": len(failing)},
                 tags={"placement": ", ".join(placements)})
    lines = ["# Nightly regressions", "", f"{len(failing)} of {len(results)} served adapters regressed "
             f"(tolerance {tolerance}).", ""]
    lines += [f"- {r['adapter']} on {r['base_family']}/{r['base_version']}: {'; '.join(r['regressions'])}"
              for r in failing]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "regressions.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        registry.log_files(run, tmp, "report")
    registry.finish_run(run, ok=not failing)
    return run
