"""Tests of the base-registered event (transpeft/events.py): a new base version starts its revalidation.

    .venv/bin/python -m pytest tests/test_events.py -q                   # all (~50 s: Prefect, MLflow, deploy)
    .venv/bin/python -m pytest tests/test_events.py -q -m "not server"   # without servers

Against a real Prefect server (one per session) and a real MLflow server: the event is stored, the CLI
emits it after registering, every failure is an error that says what happened, and the trigger of
prefect.yaml turns the event into a run of transfer-on-base-update/all-adapters for that base.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from conftest import char_tokenizer, tiny_model
from servers import PROJECT_ROOT, free_port, prefect_api, stored_events, wait_until
from transpeft.cli import main
from transpeft.events import (BASE_REGISTERED, DEFAULT_PREFECT_API_URL, TRANSFER_DEPLOYMENT, EventNotDelivered,
                              base_registered_event, check_reachable, emit, prefect_api_url)
from transpeft.tracking import Registry


def runs_of(api_url: str, deployment_id: str, family: str, version: str) -> list[dict]:
    """Flow runs of the deployment whose parameters are this family and version."""
    runs = prefect_api(api_url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
    return [r for r in runs if r["parameters"] == {"family": family, "version": version}]


# ---- the event, no server -----------------------------------------------------------------------

def test_event_is_what_the_deployment_trigger_matches():
    event = base_registered_event("demo", "v2", fingerprint="sha256:abc", parent="v1")
    deployment = next(d for d in yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())["deployments"]
                      if d["name"] == TRANSFER_DEPLOYMENT.split("/")[1])
    (trigger,) = deployment["triggers"]
    assert event["event"] in trigger["expect"] and event["event"] == BASE_REGISTERED
    for label, pattern in trigger["match"].items():
        assert fnmatch.fnmatchcase(event["resource"][label], pattern)
    # Every label the parameter templates read is on the resource, with the right value.
    templates = {name: re.fullmatch(r"\{\{ event\.resource\['(.+)'\] \}\}", value).group(1)
                 for name, value in trigger["parameters"].items()}
    assert {name: event["resource"][label] for name, label in templates.items()} == {"family": "demo",
                                                                                      "version": "v2"}
    assert event["resource"]["prefect.resource.id"] == "transpeft.base.demo.v2"
    assert event["payload"] == {"fingerprint": "sha256:abc", "parent": "v1"}
    assert datetime.fromisoformat(event["occurred"]).utcoffset().total_seconds() == 0


def test_event_id_is_random_or_derived_from_a_seed():
    assert uuid.UUID(base_registered_event("demo", "v2")["id"]).version == 4
    assert base_registered_event("demo", "v2")["id"] != base_registered_event("demo", "v2")["id"]
    replayed = [base_registered_event("demo", "v2", event_id_seed="delivery-1")["id"] for _ in range(2)]
    assert replayed[0] == replayed[1] and uuid.UUID(replayed[0]).version == 5
    assert base_registered_event("demo", "v2", event_id_seed="delivery-2")["id"] != replayed[0]


@pytest.mark.parametrize("family, version", [("", "v2"), ("demo", ""), ("demo", None)])
def test_event_needs_family_and_version(family, version):
    with pytest.raises(ValueError, match="needs a family and a version"):
        base_registered_event(family, version)


def test_api_url_is_argument_then_environment_then_default(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert prefect_api_url() == DEFAULT_PREFECT_API_URL == "http://127.0.0.1:4200/api"
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.internal:4200/api/")
    assert prefect_api_url() == "http://prefect.internal:4200/api"
    assert prefect_api_url("http://127.0.0.1:4300/api/") == "http://127.0.0.1:4300/api"


def test_nothing_listening_is_an_error_that_says_what_to_do():
    dead = f"http://127.0.0.1:{free_port()}/api"
    with pytest.raises(EventNotDelivered, match=rf"Prefect server at {dead} is not reachable.*make up.*PREFECT_API"):
        check_reachable(dead)
    with pytest.raises(EventNotDelivered, match=rf"not delivered: Prefect server at {dead} is not reachable"):
        emit(base_registered_event("demo", "v2"), dead)


# ---- against a real Prefect server ----------------------------------------------------------------

@pytest.mark.server
def test_emitted_event_is_stored(prefect_server):
    check_reachable(prefect_server)
    event = base_registered_event("stored", "v2", fingerprint="sha256:abc", mlflow_version="2")
    assert emit(event, prefect_server + "/") == event["id"]
    (stored,) = wait_until(lambda: stored_events(prefect_server, id={"id": [event["id"]]}))
    assert stored["event"] == BASE_REGISTERED
    assert stored["resource"] == event["resource"]
    assert stored["payload"] == event["payload"]
    # The trigger matches on the resource id: the same event is found by it.
    by_resource = stored_events(prefect_server, event={"name": [BASE_REGISTERED]},
                                resource={"id": ["transpeft.base.stored.v2"]})
    assert [e["id"] for e in by_resource] == [event["id"]]


@pytest.mark.server
def test_event_the_server_refuses_is_an_error(prefect_server):
    with pytest.raises(EventNotDelivered, match=r"refused event .* 422 .*occurred"):
        emit({"event": BASE_REGISTERED, "id": str(uuid.uuid4())}, prefect_server)  # no time, no resource


# ---- `transpeft bases register` -----------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny base on disk; each test registers it under its own family name."""
    path = tmp_path_factory.mktemp("bases") / "tiny" / "v1"
    tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def register(capsys, base_dir: Path, family: str, mlflow_url: str, prefect_url: str, *extra: str):
    """Run `transpeft bases register --json` in this process: (exit code, JSON answer or None, stderr)."""
    code = main(["bases", "register", "--base", str(base_dir), "--base-family", family, "--base-version", "v1",
                 "--tracking-uri", mlflow_url, "--prefect-api-url", prefect_url, "--json", *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


@pytest.mark.server
def test_register_emits_the_event(capsys, base_dir, mlflow_server, prefect_server):
    code, answer, err = register(capsys, base_dir, "emitted", mlflow_server.url, prefect_server)
    assert code == 0, err
    (stored,) = wait_until(lambda: stored_events(prefect_server, id={"id": [answer["event_id"]]}))
    assert stored["resource"]["transpeft.family"] == "emitted" and stored["resource"]["transpeft.version"] == "v1"
    assert stored["payload"] == {"fingerprint": answer["fingerprint"], "mlflow_version": answer["model_version"],
                                 "source": str(base_dir), "parent": None, "announced_by": "transpeft-cli"}
    assert [b.version for b in Registry(mlflow_server.url).bases("emitted")] == ["v1"]


@pytest.mark.server
def test_register_with_prefect_down_exits_2_and_registers_nothing(capsys, base_dir, mlflow_server):
    dead = f"http://127.0.0.1:{free_port()}/api"
    code, answer, err = register(capsys, base_dir, "unannounced", mlflow_server.url, dead)
    assert code == 2 and answer is None
    assert f"Prefect server at {dead} is not reachable" in err and "make up" in err
    assert Registry(mlflow_server.url).bases("unannounced") == []
    # --no-event registers without asking Prefect.
    code, answer, err = register(capsys, base_dir, "unannounced", mlflow_server.url, dead, "--no-event")
    assert code == 0 and "event_id" not in answer, err
    assert [b.version for b in Registry(mlflow_server.url).bases("unannounced")] == ["v1"]


@pytest.mark.server
def test_register_whose_event_is_refused_says_the_base_is_registered_and_how_to_revalidate(capsys, base_dir,
                                                                                         mlflow_server):
    # MLflow's server answers /health like Prefect's, then refuses POST /events: past the reachability
    # check, the event still fails, after the base is registered.
    code, answer, err = register(capsys, base_dir, "refused", mlflow_server.url, mlflow_server.url)
    assert code == 2 and answer is None
    assert "base refused/v1 IS registered" in err and "revalidation did not start" in err
    assert "prefect deployment run 'transfer-on-base-update/all-adapters' -p family=refused -p version=v1" in err
    assert [b.version for b in Registry(mlflow_server.url).bases("refused")] == ["v1"]


# ---- the trigger: event -> deployment run ---------------------------------------------------------

@pytest.mark.server
def test_registering_a_base_creates_a_transfer_run_with_its_family_and_version(capsys, base_dir, mlflow_server,
                                                                             prefect_server, transfer_deployment):
    code, answer, err = register(capsys, base_dir, "triggered", mlflow_server.url, prefect_server)
    assert code == 0, err
    # Event stream -> trigger -> automation action: seconds, but a loaded machine has taken over 30 s.
    (run,) = wait_until(lambda: runs_of(prefect_server, transfer_deployment, "triggered", "v1"), timeout=90)
    assert run["state"]["type"] == "SCHEDULED"  # created; no worker runs it here
    assert run["created_by"]["type"] == "AUTOMATION"
    # The same event again (an MLflow delivery replayed after a lost answer) starts no second run.
    # Triggers read the event stream, the database is written apart: the run may come first.
    (stored,) = wait_until(lambda: stored_events(prefect_server, id={"id": [answer["event_id"]]}))
    emit({key: stored[key] for key in ("id", "occurred", "event", "resource", "payload")}, prefect_server)
    time.sleep(2)
    assert len(runs_of(prefect_server, transfer_deployment, "triggered", "v1")) == 1


def test_the_prefect_api_is_the_local_stacks_on_its_port_unless_one_is_given(monkeypatch):
    from transpeft.events import DEFAULT_PREFECT_API_URL, prefect_api_url

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PORT", raising=False)
    assert prefect_api_url() == DEFAULT_PREFECT_API_URL.rstrip("/")
    monkeypatch.setenv("PREFECT_PORT", "34473")  # the stack's port, as the image's demo picks it
    assert prefect_api_url() == "http://127.0.0.1:34473/api"
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.internal:4200/api")
    assert prefect_api_url() == "http://prefect.internal:4200/api"
    assert prefect_api_url("http://given:1/api/") == "http://given:1/api"
