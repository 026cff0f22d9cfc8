"""Prefect tasks: small typed verbs over the transpeft library, one module per step.

Tasks hold no ML logic; they add what orchestration needs: retries on transient I/O only (a
server or network briefly away, never a bad adapter or a diverged run), logging, and inputs and
outputs small enough to cross to a Dask worker process.
"""

import threading
import urllib.error

import requests
from mlflow.exceptions import MlflowException
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from transpeft.events import EventNotDelivered
from transpeft.tracking import Registry, TrackingUnavailable
from transpeft.train import TrainingDiverged

TRANSIENT = (ConnectionError, TimeoutError, urllib.error.URLError, requests.ConnectionError, requests.Timeout,
             TrackingUnavailable, EventNotDelivered)
RETRY = {"retries": 3, "retry_delay_seconds": [2, 10, 30]}


def is_transient(error: BaseException) -> bool:
    if isinstance(error, TRANSIENT):
        return True
    # MLflow's client retries 429/5xx itself and then raises this; anything else is a real answer.
    return isinstance(error, MlflowException) and error.error_code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR")


def transient_io(task, task_run, state) -> bool:
    """Prefect retry condition: retry only when the failure is transient I/O."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and is_transient(error)


# Every task that talks to a server: retried on transient I/O only, never cached (they have effects).
IO = {**RETRY, "retry_condition_fn": transient_io, "cache_policy": NO_CACHE}


def is_crash(error: BaseException) -> bool:
    """A failure of the machine rather than of the adapter: out of memory, a CUDA or other runtime error."""
    return isinstance(error, RuntimeError) and not isinstance(error, TrainingDiverged)


def crash_or_transient_io(task, task_run, state) -> bool:
    """Prefect retry condition for compute on lent hardware: crashes and transient I/O."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and (is_crash(error) or is_transient(error))


# Compute that can crash (the judge of one adapter): a crash may pass on a second try, a bad adapter never.
CRASH = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": crash_or_transient_io,
         "cache_policy": NO_CACHE}


_shared: dict[tuple[str, str], Registry] = {}
_shared_lock = threading.Lock()
SHARED_KEPT = 8  # flow runs whose Registry a long-lived process (a Dask worker) keeps


def shared_registry(uri: str) -> Registry:
    """One Registry per tracking server and flow run in this process, for the tasks of a flow run that
    each talk to the server a few times: its client, experiment ids and base fingerprints are kept
    between them, and the server is checked reachable once (a server that goes away later fails the
    next request, which is retried). Outside a flow run, a Registry of its own: what it keeps must not
    outlive the server it was read from (a store reset behind the same address)."""
    run = flow_run.get_id()
    if run is None:
        return Registry(uri)
    with _shared_lock:
        key = (uri, run)
        if key not in _shared:
            _shared[key] = Registry(uri)
            for stale in list(_shared)[:-SHARED_KEPT]:
                del _shared[stale]
        return _shared[key]
