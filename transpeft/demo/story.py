"""The product's whole story on the demo family, in one command (`make demo`).

    transpeft story                 # from the project root; run it again and it reuses what is built

  data       dvc repro prepare, dvc push: the four task datasets, validated and versioned
  bases      dvc repro bases: v1 pretrained, v2 and v3 continually pretrained (5 to 7.5 min); meanwhile
  stack      transpeft stack up: Prefect, MLflow, the webhook receiver and a worker on 127.0.0.1
  v1         register v1; finetune-adapters/grid: the fleet, plain and Trans-PEFT per task
  v2         transpeft bases register v2: the event starts the revalidation by itself; wait for it
  v3         v3 created straight in MLflow: the webhook starts its revalidation; wait for it
  reference  dvc repro of the plain-v2 trainings: fine-tuning on the mild update's base, the upper bound
  report     every arm, each strategy the gate tried, its decisions, drift and compute: demo-report/, MLflow

Each step prints what it runs and how long it took; the long ones show progress as they go. The
same commands are the README's, so every number in the report can be re-run by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import urllib3

from ..auth import prefect_headers
from ..events import prefect_api_url
from ..stages import BASES, DATA

FAMILY = "demo"
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


class StoryError(RuntimeError):
    """A step of the story failed; the message says which and where its log is."""


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PREFECT_API_URL": prefect_api_url(), "MLFLOW_TRACKING_URI": _mlflow_uri()}


def _mlflow_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"http://127.0.0.1:{os.environ.get('MLFLOW_PORT', '5000')}"


def _run(*command: str) -> None:
    """Run a command with its output streamed (its own progress bars show), failing the step if it fails."""
    print(f"  $ {' '.join(command)}", flush=True)
    done = subprocess.run(list(command), env=_env())
    if done.returncode != 0:
        raise StoryError(f"`{' '.join(command)}` exited with {done.returncode}; its output is above")


# A busy Prefect server answers 503 (its database was locked) and asks to be tried again, as its own
# client does: a few tries with backoff.
_HTTP = urllib3.PoolManager(timeout=30, retries=urllib3.Retry(
    total=5, backoff_factor=0.5, status_forcelist=(429, 502, 503, 504), allowed_methods=None))


def _api(path: str, body: dict | None = None, method: str | None = None):
    response = _HTTP.request(method or ("POST" if body is not None else "GET"), prefect_api_url() + path, json=body,
                             headers=prefect_headers())
    if response.status >= 400:
        raise StoryError(f"the Prefect API answered {response.status} to {path}: {response.data[:300].decode()}")
    return json.loads(response.data or b"null")


def _deployment_id(name: str) -> str:
    return _api(f"/deployments/name/{name}")["id"]


_NOISE = ("Executing deployment step", "All deployment steps", "Beginning flow run", "View at", "Opening process",
          "Completed submission", "Finished in state", "Downloading")


def _follow(run_id: str) -> dict:
    """Wait for a flow run to end, echoing what its flow logs (each adapter as it is decided); the run."""
    seen, started, ended = 0, time.perf_counter(), 0
    while True:
        run = _api(f"/flow_runs/{run_id}")
        ended += run["state_type"] in TERMINAL
        if ended == 1:  # the last lines reach the server a moment after the run ends
            time.sleep(2)
        logs = _api("/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC",
                                     "offset": seen, "limit": 200})
        for entry in logs:
            message = entry["message"].splitlines()[0]
            if entry["level"] >= 20 and not entry.get("task_run_id") and not message.startswith(_NOISE):
                print(f"    [{time.perf_counter() - started:5.0f}s] {message[:160]}", flush=True)
        seen += len(logs)
        if run["state_type"] in TERMINAL:
            if run["state_type"] != "COMPLETED":
                ui = prefect_api_url().removesuffix("/api")
                raise StoryError(f"flow run {run['name']} ({run_id}) ended {run['state_name']}: see the Prefect UI, "
                                 f"{ui}/runs/flow-run/{run_id}, or .stack/logs/worker.log")
            return run
        time.sleep(2)


def _run_deployment(name: str, **parameters) -> dict:
    print(f"  $ prefect deployment run '{name}'" + "".join(f" -p {k}={v}" for k, v in parameters.items()), flush=True)
    run = _api(f"/deployments/{_deployment_id(name)}/create_flow_run", {"parameters": parameters})
    return _follow(run["id"])


def _triggered_run(version: str, since: datetime, timeout: float = 180) -> dict:
    """The transfer-on-base-update run the event for ``version`` created after ``since``, followed to its end."""
    deployment = _deployment_id("transfer-on-base-update/all-adapters")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _api("/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment]}},
                                          "sort": "EXPECTED_START_TIME_DESC", "limit": 20})
        for run in runs:
            created = datetime.fromisoformat(run["created"].replace("Z", "+00:00"))
            if run["parameters"] == {"family": FAMILY, "version": version} and created >= since:
                print(f"  the event started flow run {run['name']} ({run['id']}); following it", flush=True)
                return _follow(run["id"])
        time.sleep(2)
    raise StoryError(f"no transfer-on-base-update run for {FAMILY}/{version} appeared within {timeout:.0f} s: "
                     "is the worker up (`transpeft stack status`)? See .stack/logs/")


def _create_in_mlflow(version: str, parent: str) -> bool:
    """Create base-demo/<version> straight in MLflow, as a user would in its UI; False if it exists."""
    from mlflow import MlflowClient

    client = MlflowClient(_mlflow_uri())
    existing = client.search_model_versions(f"name = 'base-{FAMILY}'")
    if any(mv.tags.get("base_version") == version for mv in existing):
        return False
    experiment = client.get_experiment_by_name("register")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("register")
    run = client.create_run(experiment_id, run_name=f"base {FAMILY}/{version}, created in MLflow").info.run_id
    client.create_model_version(f"base-{FAMILY}", source=f"runs:/{run}/base", run_id=run, tags={
        "base_version": version, "source": str((BASES / version).resolve()), "parent": parent})
    print(f"  created base-{FAMILY} version for {version} in MLflow (tags base_version, source, parent)", flush=True)
    return True


def _register(version: str, parent: str | None) -> datetime:
    since = datetime.now(timezone.utc)
    _run(_bin("transpeft"), "bases", "register", "--base", str(BASES / version), "--base-family", FAMILY,
         *(["--parent", parent] if parent else []))
    return since


def run_story(report_dir: Path = Path("demo-report")) -> Path:
    """Every step above, timed; returns the report's HTML file."""
    from ..params import load_params

    params = load_params()
    tasks = list(params.train.tasks)
    timings: dict[str, float] = {}

    def step(name: str, what: str):
        print(f"\n== {name}: {what}", flush=True)
        return name, time.perf_counter()

    def done(mark) -> None:
        name, start = mark
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"== {name}: done in {timings[name]:.0f} s", flush=True)

    mark = step("data", "the task datasets, validated and versioned with DVC")
    _run(_bin("dvc"), "repro", "prepare")
    _run(_bin("dvc"), "push", "-q", "prepare")
    done(mark)

    mark = step("bases", "the demo family v1 -> v2 -> v3 (reused when already built), while the stack starts")
    stack_log = Path(".stack") / "story-stack-up.log"
    stack_log.parent.mkdir(exist_ok=True)
    with stack_log.open("w") as log:  # the servers boot while the bases train: mostly waiting, little CPU
        stack = subprocess.Popen([_bin("transpeft"), "stack", "up"], env=_env(), stdout=log, stderr=subprocess.STDOUT)
        _run(_bin("dvc"), "repro", "bases")
    done(mark)

    mark = step("stack", "Prefect server, MLflow, webhook receiver, worker")
    if stack.wait() != 0:
        raise StoryError(f"`transpeft stack up` exited with {stack.returncode}; see {stack_log}")
    print(stack_log.read_text().rstrip(), flush=True)
    done(mark)

    mark = step("v1", "register v1, then fine-tune the fleet on it (plain and Trans-PEFT, one per task)")
    _triggered_run("v1", _register("v1", None))
    _run_deployment("finetune-adapters/grid", version="v1")
    done(mark)

    mark = step("v2", "register v2 with the CLI: its revalidation starts by itself")
    _triggered_run("v2", _register("v2", "v1"))
    done(mark)

    mark = step("v3", "create v3 straight in MLflow: the webhook starts its revalidation")
    since = datetime.now(timezone.utc)
    if _create_in_mlflow("v3", "v2"):
        _triggered_run("v3", since)
    else:  # a second run of the story: announce it again, the revalidation finds everything in place
        _triggered_run("v3", _register("v3", "v2"))
    done(mark)

    mark = step("reference", "fine-tune on the mild update's base (plain-v2): the upper bound of re-tuning")
    targets = [f"train@{task}-plain-v2" for task in tasks]
    _run(_bin("dvc"), "repro", "--single-item", *targets)
    done(mark)

    mark = step("report", "every arm, each strategy the gate tried, its decisions, drift and compute")
    from .report import build_report

    html = build_report(_mlflow_uri(), tasks, DATA, report_dir, list(params.gate.strategies), timings)
    done(mark)

    total = sum(timings.values())
    print(f"\nThe story took {total / 60:.1f} min: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"""
Where to look:
  the report      {html.resolve()}  (and {html.with_suffix('.md')})
  MLflow UI       {_mlflow_uri()}  (Model training > Models: adapter-*, base-demo; Experiments: transfer, report)
  Prefect UI      {prefect_api_url().removesuffix("/api")}  (Runs: transfer-on-base-update, started by the events)
Stop the servers with `make down`; `make demo` again reuses everything built.""")
    return html
