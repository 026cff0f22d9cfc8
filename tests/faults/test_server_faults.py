"""Servers dying under the product: the tracking server killed mid-revalidation and back 10 s later; the
Prefect server down when MLflow's webhook announces a base, and back within MLflow's retries."""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import threading
import time

import pytest
import servers
from faults.recovery import GATE_PASS_ALL, assert_recovered

from flows.transfer_on_base_update import transfer_on_base_update
from servers import start_mlflow, start_prefect, stored_events, wait_until
from tasks.nightly import find_unrevalidated
from transpeft.webhook import make_server

pytestmark = pytest.mark.server
OUTAGE_S = 10


class Restartable:
    """This module's MLflow server, which a test may kill and start again on the same port and store."""

    def __init__(self, root):
        self.root, self.server = root, start_mlflow(root)
        self.url, self.log = self.server.url, self.server.log

    def kill(self) -> None:
        os.killpg(self.server.process.pid, signal.SIGKILL)  # no shutdown: a crash or an OOM kill
        self.server.process.wait(10)

    def start(self) -> None:
        self.server = start_mlflow(self.root, port=int(self.url.rsplit(":", 1)[1]))

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = Restartable(tmp_path_factory.mktemp("mlflow-restartable"))
    yield server
    server.stop()


def test_the_tracking_server_killed_mid_revalidation_and_back_10_s_later(fleet, prefect_api, mlflow_server,
                                                                         measured):
    params = fleet.params(GATE_PASS_ALL)
    result: dict = {}
    # A thread starts with empty context variables, Prefect's settings among them: without the copy its
    # flow run would go to a temporary server of Prefect's own instead of prefect_api's.
    run = threading.Thread(target=contextvars.copy_context().run, args=(lambda: result.update(
        summary=transfer_on_base_update(fleet.family, "v2", fleet.data, params)),))
    started = time.monotonic()
    run.start()
    # Killed once the revalidation has begun recording: its parent run exists, its adapters are on their way.
    assert wait_until(lambda: fleet.registry.runs("transfer", f"tags.base_family = '{fleet.family}'"), timeout=120)
    mlflow_server.kill()
    killed_at = time.monotonic() - started
    time.sleep(OUTAGE_S)
    mlflow_server.start()
    run.join(300)
    assert not run.is_alive() and "summary" in result, "the revalidation did not finish after the outage"
    took = time.monotonic() - started

    counted = assert_recovered(fleet, "v2", result["summary"])
    assert result["summary"]["state"] == "done" and counted["passed"] + counted["already_done"] == 3
    runs = servers.prefect_api(prefect_api, "/flow_runs/filter",
                               {"flows": {"name": {"any_": [transfer_on_base_update.name]}}})
    assert [r["state"]["type"] for r in runs if r["parameters"].get("family") == fleet.family] == ["COMPLETED"], \
        "the revalidation's flow run is not on the test's Prefect server"
    measured(fault=f"MLflow server killed (SIGKILL) mid-revalidation, restarted {OUTAGE_S} s later",
             promise="retried on transient errors; the job completes", adapters=3, killed_after_s=round(killed_at, 1),
             outage_s=OUTAGE_S, finished_after_s=round(took, 1), versions_after=sum(map(len, fleet.on("v2").values())),
             lost=counted["lost"], duplicated=counted["duplicated"])


def test_prefect_down_when_the_webhook_forwards_is_caught_up_by_mlflows_retries(fleet, mlflow_server, tmp_path,
                                                                               caplog, measured):
    """The receiver answers 502 while Prefect is down, MLflow retries (MLFLOW_WEBHOOK_REQUEST_MAX_RETRIES of
    mlflow/server.env: about a minute of backoff), and the event lands once when Prefect is back. Had
    the retries run out, the base would still be on the nightly reconciler's list."""
    caplog.set_level(logging.INFO, logger="transpeft.webhook")
    prefect = start_prefect(tmp_path / "prefect")
    port = int(prefect.url.split(":")[2].split("/")[0])
    prefect.stop()
    receiver = make_server("127.0.0.1", 0, "fault-secret", prefect.url)
    threading.Thread(target=receiver.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    client = fleet.registry.client
    back = None
    hook = client.create_webhook(name=f"{fleet.family}-hook", url=receiver.url, events=["model_version.created"],
                                 secret="fault-secret")
    try:
        time.sleep(2.5)  # MLflow caches each event's webhooks for MLFLOW_WEBHOOK_CACHE_TTL (2 s)
        run = client.create_run(client.create_experiment(f"{fleet.family}-hooked")).info.run_id
        client.create_registered_model(f"base-{fleet.family}-hooked")
        client.create_model_version(f"base-{fleet.family}-hooked", source=f"runs:/{run}/base", run_id=run,
                                    tags={"base_version": "v2", "source": str(fleet.root / "bases" / "v2")})
        down_at = time.monotonic()

        def refused() -> int:
            return sum(r.getMessage().startswith("failed 502") for r in caplog.records)

        assert wait_until(refused, timeout=30), caplog.text
        # Were the retries to run out, the reconciler (the nightly run's first step) has the base.
        assert [b.version for b in find_unrevalidated.fn(fleet.registry.uri, f"{fleet.family}-hooked")] == ["v2"]
        back = start_prefect(tmp_path / "prefect", port=port)
        resource = {"id": [f"transpeft.base.{fleet.family}-hooked.v2"]}
        stored = wait_until(lambda: stored_events(prefect.url, resource=resource), timeout=90, step=1)
        landed_after = time.monotonic() - down_at
        assert len(stored) == 1, caplog.text
        time.sleep(3)
        assert len(stored_events(prefect.url, resource=resource)) == 1  # one event, however many attempts
    finally:
        client.delete_webhook(hook.webhook_id)
        receiver.shutdown()
        receiver.server_close()
        if back is not None:
            back.stop()
    measured(fault="Prefect server down when MLflow's webhook announces a base", promise="the receiver answers "
             "502, MLflow retries; the event lands once when Prefect is back (else the reconciler has the base)",
             refused_deliveries=refused(), landed_after_s=round(landed_after, 1), events=len(stored), lost=0,
             duplicated=len(stored) - 1)
