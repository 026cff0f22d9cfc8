"""Tasks of nightly-regression: find what to check, score it, record it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task

from transpeft.bases import BaseRef, lend_base
from transpeft.data import load_tasks
from transpeft.nightly import record_nightly, regressions, served, unrevalidated
from transpeft.placement import Placement, placed
from transpeft.tracking import AdapterRecord, BaseRecord, Registry
from transpeft.transfer import transfer_fleet

from . import CRASH, IO


@task(**IO)
def find_unrevalidated(uri: str, family: str | None) -> list[BaseRecord]:
    """Base versions whose revalidation never finished (the reconciler's work list)."""
    return unrevalidated(Registry(uri), family)


@task(**IO)
def find_served(uri: str, family: str | None) -> list[tuple[BaseRecord, list[AdapterRecord]]]:
    """Each base version with the adapter versions served on it."""
    registry = Registry(uri)
    bases = {(b.family, b.version): b for b in registry.bases(family)}
    return [(bases[key], records) for key, records in sorted(served(registry, family).items()) if key in bases]


@task(**CRASH, task_run_name="score {base.family}/{base.version}")
def score_served(uri: str, base: BaseRecord, records: list[AdapterRecord], data_dir: str, tolerance: float,
                 placement: Placement = Placement()) -> list[dict]:
    """Every adapter served on ``base`` re-evaluated (base loaded once, on ``placement``), compared
    with its baseline."""
    registry = Registry(uri)
    results = []
    with tempfile.TemporaryDirectory(prefix="nightly-") as tmp, \
            lend_base(BaseRef(base.source, base.revision, base.family, base.version), placement=placement) as slot:
        dirs = {r.name: registry.download_adapter(r, Path(tmp) / r.name) for r in records}
        tasks = load_tasks(data_dir, sorted({t for r in records for t in r.metrics}))
        outcomes = transfer_fleet(slot.model, slot.tokenizer, slot.info, list(dirs.values()), tasks)
        for r in records:
            outcome = outcomes[str(dirs[r.name])]
            current = {t: m["exact_match"] for t, m in outcome.get("new", {}).items()}
            lines = regressions(r.metrics, current, tolerance) if outcome["verdict"] == "compatible" \
                else [f"cannot be evaluated: {'; '.join(outcome['mismatches'])}"]
            if slot.info.fingerprint != base.fingerprint:
                lines.insert(0, f"base {base.version} changed since registration (fingerprint {slot.info.fingerprint})")
            results.append({"adapter": r.name, "base_family": base.family, "base_version": base.version,
                            "model_version": r.model_version, "baseline": r.metrics, "current": current,
                            "regressions": lines, "placement": placed(slot.model)})
    return results


@task(**IO)
def record_results(uri: str, results: list[dict], tolerance: float) -> str:
    """The nightly run in MLflow."""
    return record_nightly(Registry(uri), results, tolerance)
