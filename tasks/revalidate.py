"""Tasks of transfer-on-base-update: plan, fetch, judge and record each adapter, close the run."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task

from transpeft.bases import BaseRef, lend_base, lend_beside
from transpeft.params import Gate
from transpeft.placement import Placement
from transpeft.revalidate import (Candidate, Outcome, Plan, Summary, close_revalidation, open_revalidation, plan,
                                  record_outcome, revalidate)
from transpeft.tracking import BaseRecord

from . import CRASH, IO, shared_registry


@task(**IO)
def plan_revalidation(uri: str, family: str, version: str) -> Plan:
    """The adapters to carry over to family/version, each from the latest earlier base it serves on."""
    return plan(shared_registry(uri), family, version)


@task(**IO)
def open_run(uri: str, revalidation: Plan) -> str:
    """The MLflow parent run of this revalidation."""
    return open_revalidation(shared_registry(uri), revalidation.target, revalidation)


@task(**IO, task_run_name="fetch {candidate.name}")
def fetch_adapter(uri: str, candidate: Candidate, workdir: str) -> str:
    """The adapter's registered files, downloaded from MLflow."""
    return str(shared_registry(uri).download_adapter(candidate.record, Path(workdir) / candidate.name))


@task(**CRASH, task_run_name="judge {candidate.name}")
def judge_adapter(adapter_dir: str, candidate: Candidate, target: BaseRecord, data_dir: str, gate: Gate,
                  workdir: str, placement: Placement = Placement()) -> Outcome:
    """Transfer, evaluate and gate one adapter, trying the gate's strategies in turn, or flag it.

    A bad adapter, a mismatch or a diverged re-tune is an outcome; what raises is a crash (out of
    memory, a runtime error), retried, then reported as crashed for the reconciler.
    """
    ref = BaseRef(target.source, target.revision, target.family, target.version)
    old = candidate.source_base
    teacher = (lambda: lend_beside(old, placement)) if old is not None else None
    try:
        with lend_base(ref, target.fingerprint, placement) as slot:  # an exception drops the lent instance
            outcome = revalidate(slot, Path(adapter_dir), candidate, Path(data_dir), gate,
                                 Path(workdir) / candidate.name, teacher=teacher)
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the retry starts from the memory this attempt held
        raise
    return outcome


@task(**IO, task_run_name="record {outcome.adapter}")
def record(uri: str, parent_run: str, target: BaseRecord, outcome: Outcome) -> Outcome:
    """The adapter's child run and its registry version on the new base."""
    return record_outcome(shared_registry(uri), parent_run, target, outcome)


@task(**IO)
def close_run(uri: str, parent_run: str, revalidation: Plan, outcomes: list[Outcome], crashed: list[str]) -> Summary:
    """Counts, the transfer report and the gate decisions on the parent run; the base marked revalidated."""
    return close_revalidation(shared_registry(uri), parent_run, revalidation.target, revalidation, outcomes, crashed)
