"""Tests of the embedded MLflow server scripts (mlflow/up, mlflow/down). MLflow on PostgreSQL with its
artifacts in S3, the settings mlflow/README.md gives, runs under the story (tests/test_story.py, on
`transpeft stack up --scale`, whose MLflow is the one these scripts start).

    .venv/bin/python -m pytest tests/test_mlflow_server.py -q    # ~25 s, starts real servers on 127.0.0.1

Every server runs on a free port with its store in tmp_path, and is stopped even when a test fails.
"""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from servers import free_port

pytestmark = pytest.mark.server

MLFLOW_DIR = Path(__file__).resolve().parents[1] / "mlflow"


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # A failing request fails the test at once instead of after minutes of client retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


@pytest.fixture
def scripts(tmp_path):
    """Run mlflow/up and mlflow/down against a store in tmp_path on a free port; down at teardown."""
    # Drop the caller's MLFLOW_* settings so the test sees server.env's defaults, not a developer's shell.
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(MLFLOW_PORT=str(free_port()), MLFLOW_STORE_DIR=str(tmp_path / "store"))

    def run(script: str, **extra: str) -> subprocess.CompletedProcess:
        result = subprocess.run([str(MLFLOW_DIR / script)], env={**env, **extra}, capture_output=True,
                                text=True, timeout=150)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    run.url = f"http://127.0.0.1:{env['MLFLOW_PORT']}"
    run.store = tmp_path / "store"
    yield run
    subprocess.run([str(MLFLOW_DIR / "down")], env=env, capture_output=True, timeout=60)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_state_survives_restart(scripts, tmp_path):
    from mlflow import MlflowClient

    assert "MLflow up at" in scripts("up").stdout
    assert healthy(scripts.url)
    assert "already running" in scripts("up").stdout
    client = MlflowClient(tracking_uri=scripts.url, registry_uri=scripts.url)
    run = client.create_run(client.create_experiment("restart"))
    client.log_param(run.info.run_id, "p_i", "0.1")
    client.log_metric(run.info.run_id, "retention", 0.93)
    artifact = tmp_path / "adapter_config.json"
    artifact.write_text('{"r": 8}')
    client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id)
    # A webhook secret is stored encrypted; it must still decrypt after the restart.
    hook = client.create_webhook(name="restart", url="http://127.0.0.1:9/", events=["model_version.created"],
                                 secret="s")

    assert "stopped" in scripts("down").stdout
    assert not healthy(scripts.url)
    assert not (scripts.store / "mlflow.pid").exists()
    assert "not running" in scripts("down").stdout
    scripts("up")

    again = client.get_run(run.info.run_id)
    assert again.data.params == {"p_i": "0.1"} and again.data.metrics == {"retention": 0.93}
    assert again.info.status == "FINISHED"
    assert Path(client.download_artifacts(run.info.run_id, "adapter_config.json", str(tmp_path / "dl"))
                ).read_text() == '{"r": 8}'
    assert [h.webhook_id for h in client.list_webhooks()] == [hook.webhook_id]
    assert (scripts.store / "mlflow.db").exists() and (scripts.store / "artifacts").is_dir()
