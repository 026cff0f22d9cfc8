"""Prefect flows: each puts tasks/ in order; the deployments are in prefect.yaml.

    prepare-data             dvc repro of the prepare stage, dvc push, the dataset hashes
    finetune-adapters        one adapter per task x run of params.yaml, Trans-PEFT, registered in MLflow
    register-base            a base version into MLflow, then the event that starts its revalidation
    transfer-on-base-update  every adapter of the family onto the new version: judged, re-tuned or flagged
    nightly-regression       revalidate what was missed, re-evaluate every served adapter

Run from the project root (the worker does): params.yaml and pipeline/ are found from there.
"""

from __future__ import annotations

import os

from prefect.task_runners import ThreadPoolTaskRunner

from transpeft.bases import limit_lent_bases
from transpeft.params import Fanout, ParamsError, load_params
from transpeft.tracking import tracking_uri

PARAMS = os.environ.get("TRANSPEFT_PARAMS", "params.yaml")
THREADS_PER_SLOT = 3  # an adapter's fetch, judge and record: see fanout_runner


def fanout_runner(fanout: Fanout | None = None):
    """The task runner for per-adapter fan-out, as params.yaml's ``fanout`` says, or the Dask cluster
    TRANSPEFT_DASK_ADDRESS names."""
    if fanout is None:
        try:
            fanout = load_params(PARAMS).fanout
        except ParamsError:  # imported away from a project (e.g. by `prefect deploy` elsewhere)
            fanout = Fanout()
    # The at-scale stack's worker names its Dask cluster (transpeft/stack.py): every fan-out goes there.
    address = os.environ.get("TRANSPEFT_DASK_ADDRESS") or fanout.dask_address
    if fanout.task_runner == "dask" or address:
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": fanout.max_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    _share_cores(fanout.max_workers)
    # Prefect runs a task's wait for its inputs on a pool thread: with one thread per slot, a slot's
    # thread waits for its adapter's download while the model sits idle. Each adapter is a chain of
    # three tasks (fetch, judge, record), so each slot gets three threads, and the base lender keeps
    # the model compute at max_workers at a time (the others download and record meanwhile).
    limit_lent_bases(fanout.max_workers)
    return ThreadPoolTaskRunner(max_workers=fanout.max_workers * THREADS_PER_SLOT)


def _share_cores(tasks: int) -> None:
    """Split torch's CPU threads between concurrent tasks: on 2 cores, 2 tasks x 1 thread trained four
    demo adapters 1.14x faster than one at a time and 1.52x faster than 2 x 2 (bench/bench_fanout.py)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tasks))


def registry_uri(params_file: str = PARAMS) -> str:
    """The MLflow server the flows talk to: params.yaml's tracking.uri, else $MLFLOW_TRACKING_URI."""
    return tracking_uri(load_params(params_file).tracking.get("uri"))


def failure(*chain) -> str | None:
    """Why a chain of task futures (each feeding the next) did not complete; None when it did.
    A task whose input failed only says NotReady, so the first failed link is the one to report."""
    for future in chain:
        future.wait()
        if not future.state.is_completed():
            try:
                future.result()
            except Exception as e:  # the task's own error, re-raised from its state
                return f"{type(e).__name__}: {e}"
            return future.state.message or future.state.name
    return None
