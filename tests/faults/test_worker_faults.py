"""Faults that need the worker. Killed (SIGKILL), with its flow-run process, while a revalidation re-tunes:
Prefect marks the silent run Crashed (heartbeats plus flows/automations.yaml), which frees the
deployment's slot, runs it again with its parameters, and the second run finishes the job with no manual
step. And the nightly reconciler revalidating a base while an event's run does too: one revalidation.

Its own Prefect server (a worker on the session's would pick up every run other tests schedule), the
transfer deployment of prefect.yaml, the automations as `make up` creates them, and a real
`prefect worker` process with the local stack's settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
from faults.recovery import GATE_PASS_ALL, GATE_RETUNE_ALL, PROJECT_ROOT, assert_recovered, kill_tree

from servers import deploy, prefect_api, start_prefect, wait_until
from transpeft import stack
from transpeft.events import TRANSFER_DEPLOYMENT

pytestmark = pytest.mark.server
WORK_POOL = "transpeft-local"
NIGHTLY_DEPLOYMENT = "nightly-regression/served-adapters"


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    server = start_prefect(tmp_path_factory.mktemp("prefect-worker-faults"))
    deploy(server.url, tmp_path_factory.mktemp("prefect-client"), TRANSFER_DEPLOYMENT, NIGHTLY_DEPLOYMENT)
    stack.automate(server.url, PROJECT_ROOT / stack.AUTOMATIONS)
    yield server.url
    server.stop()


def start_worker(api_url: str, log) -> psutil.Process:
    """`prefect worker start` as transpeft stack starts it: 2 s polls, a heartbeat every 30 s."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(stack.HEARTBEAT_S), "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [os.path.join(os.path.dirname(sys.executable), "prefect"), "worker", "start", "--pool", WORK_POOL,
           "--type", "process", "--install-policy", "never"]
    return psutil.Process(subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True).pid)


def flow_run(api_url: str, run_id: str) -> dict:
    return prefect_api(api_url, f"/flow_runs/{run_id}")


def running_judges(api_url: str, run_id: str) -> list[dict]:
    return prefect_api(api_url, "/task_runs/filter", {
        "flow_runs": {"id": {"any_": [run_id]}},
        "task_runs": {"name": {"like_": "judge"}, "state": {"type": {"any_": ["RUNNING"]}}}})


def test_worker_and_flow_run_killed_during_retuning_are_recovered_by_prefect_alone(fleet, prefect_api, tmp_path,
                                                                                  measured):
    from prefect.deployments import run_deployment

    params = fleet.params({**GATE_RETUNE_ALL, "retune_steps": 150})
    with open(tmp_path / "worker.log", "ab") as log:
        worker = start_worker(prefect_api, log)
        try:
            run = run_deployment(TRANSFER_DEPLOYMENT, timeout=0, parameters={
                "family": fleet.family, "version": "v2", "data_dir": fleet.data, "params_file": params})
            run_id = str(run.id)
            assert wait_until(lambda: running_judges(prefect_api, run_id), timeout=180), \
                (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(3)  # well into re-tuning
            killed = kill_tree(worker)
            killed_at = time.monotonic()
            before = fleet.on("v2")
            assert flow_run(prefect_api, run_id)["state"]["type"] == "RUNNING"  # the server cannot know yet

            worker = start_worker(prefect_api, log)  # the stack brought up again (make up)
            crashed = wait_until(lambda: flow_run(prefect_api, run_id)["state"]["type"] == "CRASHED"
                                 or flow_run(prefect_api, run_id)["run_count"] > 1, timeout=300, step=1)  # 30-90 s; more when loaded
            crashed_after = time.monotonic() - killed_at
            assert crashed, flow_run(prefect_api, run_id)["state"]
            rerun = wait_until(lambda: flow_run(prefect_api, run_id)["run_count"] > 1, timeout=60, step=1)
            rerun_after = time.monotonic() - killed_at
            assert rerun, flow_run(prefect_api, run_id)["state"]
            done = wait_until(lambda: flow_run(prefect_api, run_id)["state"]["type"] in ("COMPLETED", "FAILED"),
                              timeout=300, step=1)
            finished_after = time.monotonic() - killed_at
            final = flow_run(prefect_api, run_id)
            assert done and final["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
        finally:
            kill_tree(worker)

    (parent,) = fleet.registry.runs("transfer", f"tags.base_family = '{fleet.family}' and tags.base_version = 'v2' "
                                                "and attributes.status = 'FINISHED'")  # the killed run's never ends
    counted = assert_recovered(fleet, "v2", {"run_id": parent.info.run_id}, served=set())  # the gate fails all
    assert fleet.registry.base(fleet.family, "v2").revalidation in ("done", "done with failures")
    measured(fault="worker and flow-run process killed (SIGKILL) during re-tuning",
             promise="marked Crashed by heartbeats and the zombie automation, its slot freed, run again with its "
                     "parameters; every adapter carried once",
             adapters=3, processes_killed=killed, versions_before=sum(map(len, before.values())),
             versions_after=sum(map(len, fleet.on("v2").values())), crashed_after_s=round(crashed_after),
             rerun_after_s=round(rerun_after), finished_after_s=round(finished_after),
             runs=final["run_count"], flagged=counted["flagged"], lost=counted["lost"],
             duplicated=counted["duplicated"])


def transfer_runs(api_url: str, family: str, version: str) -> list[dict]:
    """The transfer deployment's flow runs for family/version, first started first."""
    runs = prefect_api(api_url, "/flow_runs/filter", {"flow_runs": {"name": {}}, "deployments": {"name": {
        "any_": [TRANSFER_DEPLOYMENT.split("/")[1]]}}})
    ours = [r for r in runs if r["parameters"].get("family") == family and r["parameters"].get("version") == version]
    return sorted(ours, key=lambda r: r["start_time"] or "~")


def test_the_reconciler_beside_an_event_run_of_the_same_base_makes_one_revalidation(fleet, prefect_api, tmp_path,
                                                                                    measured):
    """The nightly reconciler goes through the transfer deployment (run_deployment), so its concurrency
    limit queues a second revalidation of a base behind the first, and the second finds the job done."""
    from prefect.deployments import run_deployment

    params = fleet.params(GATE_PASS_ALL)
    fleet.registry.mark_revalidation(fleet.family, "v1", "done", "-")  # the adapters were trained there
    transfer = {"family": fleet.family, "version": "v2", "data_dir": fleet.data, "params_file": params}
    with open(tmp_path / "worker.log", "ab") as log:
        worker = start_worker(prefect_api, log)
        try:
            nightly = run_deployment(NIGHTLY_DEPLOYMENT, timeout=0, parameters={
                "family": fleet.family, "data_dir": fleet.data, "params_file": params})
            # The reconciler has asked the deployment for v2's revalidation; the event's run comes now.
            assert wait_until(lambda: transfer_runs(prefect_api, fleet.family, "v2"), timeout=180, step=1), \
                (tmp_path / "worker.log").read_text()[-3000:]
            run_deployment(TRANSFER_DEPLOYMENT, timeout=0, parameters=transfer)
            ended = wait_until(lambda: all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")
                                           for r in [*transfer_runs(prefect_api, fleet.family, "v2"),
                                                     flow_run(prefect_api, str(nightly.id))]),
                               timeout=300, step=1)
            assert ended, (tmp_path / "worker.log").read_text()[-3000:]
        finally:
            kill_tree(worker)

    first, second = runs = transfer_runs(prefect_api, fleet.family, "v2")
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"]
    assert second["start_time"] >= first["end_time"], "the two revalidations of v2 ran at once"
    reconciler = flow_run(prefect_api, str(nightly.id))
    assert reconciler["state_type"] == "COMPLETED", (reconciler["state"].get("message"),
                                                     (tmp_path / "worker.log").read_text()[-6000:])
    parents = sorted(fleet.registry.runs("transfer", f"tags.base_family = '{fleet.family}' and "
                                                     "tags.base_version = 'v2'"), key=lambda r: r.info.start_time)
    assert len(parents) == 2
    counted = assert_recovered(fleet, "v2", {"run_id": parents[0].info.run_id})
    assert counted["already_done"] == 0
    again = {k: int(v) for k, v in parents[1].data.metrics.items() if k.startswith("adapters.")}
    assert again["adapters.already_done"] == len(fleet.adapters)  # the second found the job done
    assert fleet.registry.base(fleet.family, "v2").revalidation == "done"
    measured(fault="the nightly reconciler and an event's run revalidating one base at once",
             promise="the deployment's concurrency limit queues the second; it finds every adapter done",
             adapters=len(fleet.adapters), runs=len(runs), revalidations=1,
             versions_after=sum(map(len, fleet.on("v2").values())), lost=counted["lost"],
             duplicated=counted["duplicated"])
