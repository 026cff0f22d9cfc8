"""Locked doors: the stack's servers with auth on refuse strangers and take the stack's own clients.

    .venv/bin/python -m pytest tests/test_auth.py -q      # about 30 s

The story test runs the whole product with auth on (tests/test_story.py); here are the refusals.
"""

from __future__ import annotations

import json
import secrets
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from servers import free_port

from transpeft import auth, stack
from transpeft.events import base_registered_event, emit

ROOT = Path(__file__).resolve().parents[1]
SECRETS = (auth.MLFLOW_USER, auth.MLFLOW_PASSWORD, auth.PREFECT_AUTH, f"{auth.MLFLOW_PASSWORD}_FILE",
           f"{auth.PREFECT_AUTH}_FILE")


def status_of(url: str, body: dict | None = None) -> int:
    """The HTTP status a client without credentials gets."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_secret_is_read_from_the_file_its_variable_names(tmp_path):
    (tmp_path / "prefect").write_text("admin:from-a-file\n")
    env = {f"{auth.PREFECT_AUTH}_FILE": str(tmp_path / "prefect"), auth.MLFLOW_PASSWORD: "kept-as-it-is"}
    auth.from_files(env)
    assert env[auth.PREFECT_AUTH] == "admin:from-a-file"
    assert env[auth.MLFLOW_PASSWORD] == "kept-as-it-is" and env[auth.MLFLOW_USER] == "admin"
    assert auth.prefect_headers(env) == {"Authorization": "Basic YWRtaW46ZnJvbS1hLWZpbGU="}
    with pytest.raises(auth.AuthError, match=f"{auth.MLFLOW_PASSWORD}_FILE=.*missing.*cannot be read"):
        auth.from_files({f"{auth.MLFLOW_PASSWORD}_FILE": str(tmp_path / "missing")})


def test_servers_reachable_from_other_hosts_need_both_secrets():
    auth.check({"mlflow": "127.0.0.1", "prefect-server": "localhost"}, {})  # loopback: auth is optional
    with pytest.raises(auth.AuthError, match="prefect-server on 0.0.0.0 would be reachable .* no authentication"):
        auth.check({"prefect-server": "0.0.0.0"}, {auth.MLFLOW_PASSWORD: "long-enough-password"})
    with pytest.raises(auth.AuthError, match="at least 12 characters"):
        auth.check({}, {auth.MLFLOW_PASSWORD: "short"})
    with pytest.raises(auth.AuthError, match='"user:password"'):
        auth.check({}, {auth.PREFECT_AUTH: "no-colon"})
    auth.check({"mlflow": "0.0.0.0"}, {auth.MLFLOW_PASSWORD: "long-enough-password", auth.PREFECT_AUTH: "a:b"})


@pytest.fixture
def locked(tmp_path, monkeypatch):
    """The container's configuration in a copy of the project: servers on 0.0.0.0, free ports."""
    root = tmp_path / "project"
    (root / "mlflow").mkdir(parents=True)
    shutil.copy2(ROOT / "prefect.yaml", root)
    for name in ("server.env", "webhook_receiver.py"):
        shutil.copy2(ROOT / "mlflow" / name, root / "mlflow")
    for key in (*SECRETS, "TRANSPEFT_STACK_DIR", "MLFLOW_STORE_DIR", "MLFLOW_BACKEND_STORE_URI",
                "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", "MLFLOW_TRACKING_URI",
                "TRANSPEFT_LOCAL_WEBHOOKS"):  # the image sets it; this is the default that the test checks
        monkeypatch.delenv(key, raising=False)
    for key, value in {"PREFECT_PORT": free_port(), "MLFLOW_PORT": free_port(), "TRANSPEFT_BIND_HOST": "0.0.0.0",
                       "MLFLOW_HOST": "0.0.0.0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_UI_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        monkeypatch.setenv(key, str(value))
    local = stack.Stack.find(root)
    monkeypatch.setenv("PREFECT_API_URL", local.prefect_api_url)
    try:
        yield local
    finally:
        stack.down(local, say=lambda line: None, timeout=10)


@pytest.mark.server
def test_a_locked_stack_refuses_strangers_and_takes_its_own_clients(locked, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    with pytest.raises(stack.StackError, match="refused to start: .*0.0.0.0 would be reachable"):
        stack.up(locked, say=lambda line: None)
    assert not any(row["running"] for row in stack.status(locked).values())

    password = secrets.token_urlsafe(16)
    monkeypatch.setenv(auth.MLFLOW_PASSWORD, password)
    monkeypatch.setenv(auth.MLFLOW_USER, "admin")
    monkeypatch.setenv(auth.PREFECT_AUTH, f"admin:{secrets.token_urlsafe(16)}")
    for folder in (locked.prefect_home, locked.state / "logs"):
        folder.mkdir(parents=True)
    server = stack.start_prefect_server(locked, say=lambda line: None)
    stack.start_mlflow(locked, say=lambda line: None)
    stack._wait(locked, "prefect-server", server, 90)

    # Strangers: refused everywhere but the health probes.
    assert status_of(f"{locked.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert status_of(f"{locked.mlflow_url}/api/2.0/mlflow/registered-models/create", {"name": "base-x"}) == 401
    assert status_of(f"{locked.prefect_api_url}/deployments/filter", {}) == 401
    assert status_of(f"{locked.prefect_api_url}/events", [base_registered_event("x", "v2")]) == 401
    assert status_of(f"{locked.mlflow_url}/health") == status_of(f"{locked.prefect_api_url}/health") == 200

    # The stack's own clients, handed the environment, get through.
    client = MlflowClient(locked.mlflow_url)
    client.create_registered_model("base-locked")
    assert client.get_registered_model("base-locked").name == "base-locked"
    assert stack.deployed(locked) == []
    event = base_registered_event("locked", "v2")
    assert emit(event, locked.prefect_api_url) == event["id"]

    # MLflow listens beyond loopback, so it sends no webhook to a private address.
    with pytest.raises(MlflowException, match="public"):
        client.create_webhook(name="inward", url="http://127.0.0.1:5055/", events=["model_version.created"])

    # Another password than the admin was created with: refused at start, with what to do.
    stack.stop(locked, "mlflow", say=lambda line: None)
    monkeypatch.setenv(auth.MLFLOW_PASSWORD, password + "-changed")
    with pytest.raises(stack.StackError, match="admin was created with another password"):
        stack.start_mlflow(locked, say=lambda line: None)


def test_mlflow_sends_webhooks_to_private_addresses_only_on_loopback_or_when_the_deployment_opts_in():
    from transpeft.stack import local_webhooks

    assert local_webhooks("127.0.0.1", {}) and local_webhooks("localhost", {})
    assert not local_webhooks("0.0.0.0", {})  # reachable from other hosts: they could aim it inside
    assert local_webhooks("0.0.0.0", {"TRANSPEFT_LOCAL_WEBHOOKS": "1"})  # the image's choice (Dockerfile)
