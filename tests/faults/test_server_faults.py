"""A server dying under a revalidation: the tracking server killed mid-run and back 10 s later."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from faults.recovery import GATE_PASS_ALL, assert_recovered

from flows.transfer_on_base_update import transfer_on_base_update
from servers import start_mlflow, wait_until

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
    run = threading.Thread(target=lambda: result.update(
        summary=transfer_on_base_update(fleet.family, "v2", fleet.data, params)))
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
    measured(fault=f"MLflow server killed (SIGKILL) mid-revalidation, restarted {OUTAGE_S} s later",
             promise="retried on transient errors; the job completes", adapters=3, killed_after_s=round(killed_at, 1),
             outage_s=OUTAGE_S, finished_after_s=round(took, 1), versions_after=sum(map(len, fleet.on("v2").values())),
             lost=counted["lost"], duplicated=counted["duplicated"])
