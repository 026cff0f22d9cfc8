"""Bursts of announcements on the real Prefect server and the deployment's own trigger (prefect.yaml):
one registration announced 20 times is one revalidation; two versions registered within a second are
two. No worker runs here, so the runs the trigger creates stay Scheduled: what is counted is runs."""

from __future__ import annotations

import json
import time

import pytest

from servers import prefect_api, wait_until
from transpeft.cli import main

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def bases(world):
    return world / "bases"


def register(capsys, base, family: str, version: str, mlflow_url: str, prefect_url: str) -> dict:
    """`transpeft bases register --json`, in this process; its answer."""
    code = main(["bases", "register", "--base", str(base), "--base-family", family, "--base-version", version,
                 "--tracking-uri", mlflow_url, "--prefect-api-url", prefect_url, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def runs_of(api_url: str, deployment_id: str, family: str) -> dict[str, int]:
    """How many flow runs of the deployment each base version of ``family`` has."""
    runs = prefect_api(api_url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
    counts: dict[str, int] = {}
    for run in runs:
        if run["parameters"].get("family") == family:
            counts[run["parameters"]["version"]] = counts.get(run["parameters"]["version"], 0) + 1
    return counts


def test_twenty_announcements_of_one_base_within_10_s_start_one_revalidation(capsys, bases, mlflow_server,
                                                                            prefect_server, transfer_deployment,
                                                                            measured):
    started = time.monotonic()
    answers = [register(capsys, bases / "v1", "burst", "v1", mlflow_server.url, prefect_server) for _ in range(20)]
    burst = time.monotonic() - started
    assert burst < 10 and len({a["model_version"] for a in answers}) == 1
    assert len({a["event_id"] for a in answers}) == 1  # one registration, one event id
    assert wait_until(lambda: runs_of(prefect_server, transfer_deployment, "burst"), timeout=30)
    time.sleep(3)  # any second run would be created by now
    runs = runs_of(prefect_server, transfer_deployment, "burst")
    assert runs == {"v1": 1}
    measured(fault="20 announcements of one base registration within 10 s", promise="one revalidation",
             events=20, burst_s=round(burst, 1), runs=runs["v1"], duplicated=runs["v1"] - 1)


def test_two_base_versions_registered_within_one_second_are_both_revalidated(capsys, bases, mlflow_server,
                                                                             prefect_server, transfer_deployment,
                                                                             measured):
    started = time.monotonic()
    register(capsys, bases / "v1", "pair", "v1", mlflow_server.url, prefect_server)
    register(capsys, bases / "v2", "pair", "v2", mlflow_server.url, prefect_server)
    apart = time.monotonic() - started
    assert apart < 2, f"the two registrations took {apart:.1f} s"  # ~0.5 s here
    runs = wait_until(lambda: (r := runs_of(prefect_server, transfer_deployment, "pair")) == {"v1": 1, "v2": 1}
                      and r, timeout=30)
    assert runs == {"v1": 1, "v2": 1}, runs_of(prefect_server, transfer_deployment, "pair")
    measured(fault="two base versions registered within one second", promise="both revalidated (the deployment "
             "runs them one at a time)", registrations=2, apart_s=round(apart, 2), runs=sum(runs.values()),
             lost=2 - len(runs), duplicated=sum(runs.values()) - len(runs))
