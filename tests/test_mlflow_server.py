"""Tests of the embedded MLflow server scripts (mlflow/up, mlflow/down) and of S3 artifacts through moto.

    .venv/bin/python -m pytest tests/test_mlflow_server.py -q    # ~40 s, starts real servers on 127.0.0.1

Every server runs on a free port with its store in tmp_path, and is stopped even when a test fails.
"""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from servers import free_port, start_moto_s3

pytestmark = pytest.mark.server

MLFLOW_DIR = Path(__file__).resolve().parents[1] / "mlflow"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}


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


def test_artifacts_on_s3(scripts, tmp_path):
    import boto3
    from mlflow import MlflowClient

    moto = start_moto_s3(log_dir=tmp_path)
    try:
        s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket="transpeft")  # MLflow does not create buckets
        scripts("up", MLFLOW_ARTIFACTS_DESTINATION="s3://transpeft/mlflow", MLFLOW_S3_ENDPOINT_URL=moto.url,
                **S3_CREDENTIALS)

        client = MlflowClient(tracking_uri=scripts.url)
        run = client.create_run(client.create_experiment("s3"))
        artifact = tmp_path / "adapter_config.json"
        artifact.write_text('{"peft_type": "LORA"}')
        client.log_artifact(run.info.run_id, str(artifact), artifact_path="adapter")
        # The client talks only to the tracking server, which proxies to S3: no credentials needed here.
        local = client.download_artifacts(run.info.run_id, "adapter/adapter_config.json", str(tmp_path / "dl"))
        assert Path(local).read_text() == '{"peft_type": "LORA"}'

        keys = [obj["Key"] for obj in s3.list_objects_v2(Bucket="transpeft", Prefix="mlflow/").get("Contents", [])]
        assert len(keys) == 1 and keys[0].endswith(f"{run.info.run_id}/artifacts/adapter/adapter_config.json"), keys
        assert s3.get_object(Bucket="transpeft", Key=keys[0])["Body"].read() == b'{"peft_type": "LORA"}'
        assert not (scripts.store / "artifacts").exists()  # nothing went to the local default
    finally:
        scripts("down")
        moto.stop()
