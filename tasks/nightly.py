"""Tasks of nightly-regression: find what to check, score it, record it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import get_run_logger, task

from transpeft.bases import BaseLoadError, BaseRef, lend_base
from transpeft.nightly import Check, check_served, record_nightly, served, unrevalidated
from transpeft.placement import Placement
from transpeft.tracking import AdapterRecord, BaseRecord, NotRegistered

from . import CRASH, IO, shared_registry


@task(**IO)
def find_unrevalidated(uri: str, family: str | None) -> list[BaseRecord]:
    """Base versions whose revalidation never finished (the reconciler's work list), after finishing any
    registration a crash left in "registering" and adopting versions created straight in MLflow (their
    webhook may never have reached Prefect). One that cannot be adopted is reported and left for later."""
    registry = shared_registry(uri)
    registry.finish_stuck_registrations(family)
    for base_family, version in registry.created_in_mlflow(family):
        try:
            registry.adopt_base(base_family, version)
        except (NotRegistered, BaseLoadError) as e:
            get_run_logger().warning("reconciler: %s/%s created in MLflow cannot be revalidated yet: %s",
                                     base_family, version, e)
    return unrevalidated(registry, family)


@task(**IO)
def find_served(uri: str, family: str | None) -> list[tuple[BaseRecord, list[AdapterRecord]]]:
    """Each base version with the adapter versions served on it."""
    registry = shared_registry(uri)
    bases = {(b.family, b.version): b for b in registry.bases(family)}
    return [(bases[key], records) for key, records in sorted(served(registry, family).items()) if key in bases]


@task(**CRASH, task_run_name="score {base.family}/{base.version}")
def score_served(uri: str, base: BaseRecord, records: list[AdapterRecord], data_dir: str, tolerance: float,
                 placement: Placement = Placement()) -> list[Check]:
    """Every adapter served on ``base`` re-evaluated (base loaded once, on ``placement``) against its baseline."""
    registry = shared_registry(uri)
    with tempfile.TemporaryDirectory(prefix="nightly-") as tmp, \
            lend_base(BaseRef(base.source, base.revision, base.family, base.version), placement=placement) as slot:
        adapters = {r.name: (r, registry.download_adapter(r, Path(tmp) / r.name)) for r in records}
        return check_served(slot, base, adapters, data_dir, tolerance)


@task(**IO)
def record_results(uri: str, checks: list[Check], tolerance: float) -> str:
    """The nightly run in MLflow."""
    return record_nightly(shared_registry(uri), checks, tolerance)
