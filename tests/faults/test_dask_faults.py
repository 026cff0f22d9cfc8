"""A Dask worker lost mid-revalidation: the at-scale fan-out's cluster, a scheduler and two worker processes
as `transpeft stack up --scale` starts them, and one worker SIGKILLed with its nanny while it re-tunes an
adapter. The scheduler gives the lost worker's tasks to the one left; whatever it cannot finish is left
for the nightly reconciler (the base says incomplete), whose run carries what is missing. Either way no
adapter is lost and none is carried twice."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from urllib.parse import urlparse

import pytest
from faults.recovery import GATE_RETUNE_ALL, PROJECT_ROOT, assert_recovered, kill_tree

from servers import free_port, wait_until
from transpeft import stack
from transpeft.nightly import unrevalidated

pytestmark = pytest.mark.server

FLOW = """
import json, sys
from flows.transfer_on_base_update import transfer_on_base_update
print("RESULT " + json.dumps(transfer_on_base_update(family=sys.argv[1], version="v2", data_dir=sys.argv[2],
                                                     params_file=sys.argv[3])))
"""


@pytest.fixture
def cluster(tmp_path, mlflow_server, prefect_api):
    """The stack's Dask scheduler and two workers, pointed at the test servers; stopped afterwards."""
    local = dataclasses.replace(stack.Stack.find(PROJECT_ROOT), state=tmp_path / "stack",
                                prefect_home=tmp_path / "prefect", mlflow_store=tmp_path / "mlflow",
                                prefect_port=urlparse(prefect_api).port, mlflow_port=urlparse(mlflow_server.url).port,
                                dask_port=free_port())
    (local.state / "logs").mkdir(parents=True)
    try:
        stack.start_dask(local, say=lambda line: None)
        yield local
    finally:
        for name in (*stack.DASK_WORKERS, "dask-scheduler"):
            stack.stop(local, name, say=lambda line: None, timeout=10)


def revalidation(local: stack.Stack, fleet, params: str, dask: bool) -> subprocess.Popen:
    """transfer-on-base-update of v2 in a flow-run process of its own, on the cluster or on threads."""
    env = local.env(PYTHONPATH=str(PROJECT_ROOT), TRANSPEFT_PARAMS=params)
    if dask:
        env["TRANSPEFT_DASK_ADDRESS"] = local.dask_address
    return subprocess.Popen([sys.executable, "-c", FLOW, fleet.family, fleet.data, params], cwd=PROJECT_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def summary_of(process: subprocess.Popen, timeout: float = 600) -> dict:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])


def judging_worker(local: stack.Stack) -> str | None:
    """The stack name (dask-worker-N) of a worker running a judge task, if one is."""
    from distributed import Client

    with Client(local.dask_address, timeout=10) as client:
        names = {address: w["name"] for address, w in client.scheduler_info()["workers"].items()}
        for address, keys in client.processing().items():
            if any("judge" in str(key) for key in keys):
                return names[address].removeprefix("transpeft-")
    return None


def test_a_dask_worker_killed_while_it_retunes_loses_no_adapter(fleet, cluster, tmp_path, measured):
    params = fleet.params({**GATE_RETUNE_ALL, "retune_steps": 150})
    flow = revalidation(cluster, fleet, params, dask=True)
    victim = wait_until(lambda: judging_worker(cluster), timeout=240, step=0.5)
    assert victim, "no judge task reached the cluster"
    time.sleep(3)  # into re-tuning
    killed = kill_tree(stack._process(cluster, victim))  # the nanny and its worker process: a lost machine
    killed_at = time.monotonic()
    first = summary_of(flow)
    first_after = time.monotonic() - killed_at

    runs, final = [first], first
    if first["state"] == "incomplete":  # what the cluster could not finish is the reconciler's
        assert (fleet.family, "v2") in {(b.family, b.version) for b in unrevalidated(fleet.registry, fleet.family)}
        final = summary_of(revalidation(cluster, fleet, params, dask=False))  # the run the reconciler starts
        runs.append(final)
    assert final["state"] in ("done", "done with failures"), runs
    counted = assert_recovered(fleet, "v2", {"run_id": final["run_id"]}, served=set())  # the gate fails all
    measured(fault="a Dask worker SIGKILLed (with its nanny) while it re-tunes an adapter",
             promise="the scheduler moves its tasks to the worker left; what it cannot finish the nightly "
                     "reconciler carries; every adapter carried once",
             adapters=len(fleet.adapters), processes_killed=killed, first_run=first["state"],
             first_run_after_kill_s=round(first_after), runs=len(runs),
             crashed_in_first_run=first["failed"], lost=counted["lost"], duplicated=counted["duplicated"])
