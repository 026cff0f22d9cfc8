"""`transpeft stack up | down | status` against real servers, in a copy of the project on free ports.

    .venv/bin/python -m pytest tests/test_stack.py -q      # about 90 s: a cold `prefect deploy --all`

The copy holds what the stack reads (prefect.yaml, params.yaml, flows/, tasks/, mlflow/'s settings and receiver), so
its Prefect database, MLflow store and .stack/ live under tmp_path and never touch a user's stack.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from servers import free_port

from transpeft import stack

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("prefect-server", "mlflow", "webhook-receiver", "worker")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A copy of the project on free ports; whatever the test leaves running is stopped afterwards."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("prefect.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, root / name)
    for folder in ("flows", "tasks"):
        if (ROOT / folder).is_dir():
            shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "mlflow").mkdir()
    for name in ("server.env", "webhook_receiver.py"):
        shutil.copy2(ROOT / "mlflow" / name, root / "mlflow" / name)
    for key in ("TRANSPEFT_STACK_DIR", "MLFLOW_STORE_DIR", "TRANSPEFT_WEBHOOK_SECRET", "PREFECT_API_URL",
                "MLFLOW_TRACKING_URI", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION",
                "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", "PREFECT_API_DATABASE_CONNECTION_URL", "TRANSPEFT_BIND_HOST",
                "MLFLOW_HOST", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD_FILE",
                "PREFECT_API_AUTH_STRING_FILE"):
        monkeypatch.delenv(key, raising=False)
    ports = {"PREFECT_PORT": free_port(), "MLFLOW_PORT": free_port(), "TRANSPEFT_WEBHOOK_PORT": free_port()}
    for key, value in {**ports, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, str(value))
    local = stack.Stack.find(root)
    try:
        yield local
    finally:
        stack.down(local, say=lambda line: None, timeout=10)


def transpeft_stack(local: stack.Stack, command: str) -> str:
    """Run `transpeft stack <command>` in the project, as a user would; its output."""
    result = subprocess.run([sys.executable, "-m", "transpeft.cli", "stack", command], cwd=local.project,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"stack {command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def get(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def deployments(local: stack.Stack) -> dict[str, str]:
    """name -> id of the deployments on the Prefect server."""
    return {row["name"]: row["id"] for row in get(local.prefect_api_url + "/deployments/filter", {"limit": 200})}


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def our_webhooks(client) -> list:
    return [hook for hook in client.list_webhooks() if hook.name == stack.WEBHOOK_NAME]


def assert_delivers(client) -> None:
    """MLflow signs a test delivery with the stored secret and the receiver accepts the signature (a
    bad one is a 401; the test payload is no base model, so it is acknowledged and ignored)."""
    (hook,) = our_webhooks(client)
    result = client.test_webhook(hook.webhook_id)
    assert result.success and result.response_status == 200, result


def test_up_down_up_keeps_deployments_and_mlflow_data(project):
    from mlflow.tracking import MlflowClient

    local = project
    out = transpeft_stack(local, "up")
    assert f"Prefect UI  {local.prefect_url}" in out
    assert f"export PREFECT_API_URL={local.prefect_api_url} MLFLOW_TRACKING_URI={local.mlflow_url}" in out

    report = stack.status(local)
    assert all(report[name]["running"] and report[name]["answers"] for name in COMPONENTS), report
    assert get(local.prefect_api_url + "/health") is True
    for url in (local.mlflow_url + "/health", local.webhook_url + "health"):
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
    assert local.prefect_home.joinpath("prefect.db").exists()  # state under the project, not ~/.prefect
    first = deployments(local)
    assert set(local.deployments()) <= set(first), first
    assert stack.worker_online(local)
    secret_file = local.state / "webhook.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    client = MlflowClient(tracking_uri=local.mlflow_url)
    hooks = our_webhooks(client)
    assert [(h.url, [str(e) for e in h.events]) for h in hooks] == [(local.webhook_url, ["model_version.created"])]
    assert_delivers(client)
    experiment_id = client.create_experiment("stack-state-survives")
    secret = secret_file.read_text()

    # Idempotent: a second `up` starts nothing, redeploys nothing and adds no webhook.
    pids = {name: row["pid"] for name, row in report.items()}
    lines = []
    stack.up(local, say=lines.append)
    assert {name: row["pid"] for name, row in stack.status(local).items()} == pids
    assert any("deployments: unchanged" in line for line in lines), lines
    assert len(our_webhooks(client)) == 1
    automations = get(local.prefect_api_url + "/automations/filter", {})
    assert sorted(a["name"] for a in automations if a["name"].startswith("transpeft-")) == [
        "transpeft-crash-zombie-runs", "transpeft-rerun-crashed-revalidation"]  # updated, not doubled

    out = transpeft_stack(local, "down")
    assert out.index("worker:") < out.index("webhook-receiver:") < out.index("prefect-server:") < out.index("mlflow:")
    assert not any(row["running"] for row in stack.status(local).values())
    ports = (local.prefect_port, local.mlflow_port, local.webhook_port)
    assert not any(listening(port) for port in ports)
    assert not list(local.state.glob("*.pid")) and not local.pid_file("mlflow").exists()
    lines = []
    stack.down(local, say=lines.append)  # idempotent
    assert lines == [f"{name}: not running" for name in stack.STOP_ORDER]

    # Pid files a crash left behind, one naming a reused pid: up starts those components anyway.
    with stale_pid_files(local, "prefect-server", "worker"):
        lines = []
        stack.up(local, say=lines.append)
    out = "\n".join(lines)
    assert "deployments: unchanged" in out  # the Prefect database kept them: nothing redeployed
    assert deployments(local) == first
    assert stack.worker_online(local)
    assert client.get_experiment(experiment_id).name == "stack-state-survives"
    assert "already running" not in out
    assert secret_file.read_text() == secret
    assert_delivers(client)  # the webhook's encrypted secret survived the restart, and matches the receiver's


@contextlib.contextmanager
def stale_pid_files(local: stack.Stack, *names: str):
    """Pid files of `names` naming, in turn, a process that exited and a live one that is no component."""
    exited = subprocess.Popen(["true"])
    exited.wait()
    with subprocess.Popen(["sleep", "300"]) as other:
        for n, name in enumerate(names):
            local.pid_file(name).parent.mkdir(parents=True, exist_ok=True)
            local.pid_file(name).write_text(f"{(exited, other)[n % 2].pid}\n")
        try:
            yield
            assert other.poll() is None  # never signalled: its pid was only in a stale file
        finally:
            other.kill()


def test_stale_pid_files_are_removed_and_their_pids_left_alone(project):
    with stale_pid_files(project, *COMPONENTS):
        project.pid_file("mlflow").write_text("not a pid\n")
        assert not any(row["running"] for row in stack.status(project).values())
        lines = []
        stack.down(project, say=lines.append)
    assert lines == [f"{name}: not running" for name in stack.STOP_ORDER]
    assert not any(project.pid_file(name).exists() for name in COMPONENTS)


def test_outside_a_project_is_refused(tmp_path):
    with pytest.raises(stack.StackError, match="no prefect.yaml"):
        stack.Stack.find(tmp_path)


def test_a_taken_port_names_the_component_and_the_variable(project):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", project.prefect_port))
        squatter.listen()
        with pytest.raises(stack.StackError, match=r"prefect-server: port \d+ .* set PREFECT_PORT"):
            stack.start_prefect_server(project, say=lambda line: None)
    assert not project.pid_file("prefect-server").exists()
