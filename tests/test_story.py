"""`make demo`'s story end to end on the test profile: a copy of the project, its own git + DVC repo,
the real local stack on free ports with auth on (MLflow's basic-auth app, Prefect's auth string), and
the report with every arm. About 3 minutes."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from servers import free_port

from transpeft import stack
from transpeft.tracking import Registry

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    root.mkdir()
    for name in ("prefect.yaml", "params.yaml", "dvc.yaml"):
        shutil.copy2(ROOT / name, root / name)
    for folder in ("flows", "tasks", "transpeft", "datasets", "mlflow"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "store"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"].update(n_train=48, n_eval=8)
    params["bases"]["profile"] = "test"
    params["train"]["tasks"] = ["reverse", "add"]
    params["train"]["schedule"].update(steps=10, batch_size=8)
    params["gate"]["retune_steps"] = 5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    ports = {"PREFECT_PORT": free_port(), "MLFLOW_PORT": free_port(), "TRANSPEFT_WEBHOOK_PORT": free_port()}
    for key in ("TRANSPEFT_STACK_DIR", "MLFLOW_STORE_DIR", "TRANSPEFT_WEBHOOK_SECRET", "MLFLOW_BACKEND_STORE_URI",
                "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", "TRANSPEFT_BIND_HOST",
                "MLFLOW_HOST", "MLFLOW_TRACKING_PASSWORD_FILE", "PREFECT_API_AUTH_STRING_FILE"):
        monkeypatch.delenv(key, raising=False)
    # With auth on: every step, the worker's flow runs and the webhook receiver sign in with these.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets.token_urlsafe(16))
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", f"admin:{secrets.token_urlsafe(16)}")
    for key, value in {**ports, "PREFECT_API_URL": f"http://127.0.0.1:{ports['PREFECT_PORT']}/api",
                       "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['MLFLOW_PORT']}",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, str(value))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"],
                    ["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)
    try:
        yield root
    finally:
        stack.down(stack.Stack.find(root), say=lambda line: None, timeout=10)


def test_the_story_revalidates_v2_and_v3_by_itself_and_reports_every_arm(project):
    done = subprocess.run([sys.executable, "-m", "transpeft.cli", "story", "--report", "report"], cwd=project,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for step in ("data", "bases", "stack", "v1", "v2", "v3", "reference", "report"):
        assert f"== {step}: done in" in done.stdout
    assert "the event started flow run" in done.stdout and "Where to look:" in done.stdout

    registry = Registry(os.environ["MLFLOW_TRACKING_URI"])
    fleet = {name: {r.base_version for r in rows} for name, rows in registry.adapters().items()}
    flagged = {r.base_version for rows in registry.adapters().values() for r in rows if r.status == "failed-gate"}
    # A base whose revalidation flagged an adapter says so; every other one is plainly done.
    assert [(b.version, b.revalidation) for b in registry.bases("demo")] == [
        (v, "done with failures" if v in flagged else "done") for v in ("v1", "v2", "v3")]
    assert fleet == {f"{task}-{run}": {"v1", "v2", "v3"} for task in ("reverse", "add")
                     for run in ("plain-v1", "transpeft-v1")}

    report = (project / "report" / "report.md").read_text()
    for version in ("v2", "v3"):
        header = next(line for line in report.splitlines() if line.startswith("| task |"))
        assert header.count("|") == 8  # task + the six arms
        assert f"## v1 -> {version}: exact match (%) per arm" in report
        assert (project / "report" / f"arms_{version}.png").stat().st_size > 0
    rows = [line for line in report.splitlines() if line.startswith(("| reverse |", "| add |"))]
    assert len(rows) == 4, rows
    assert not any("| - |" in row for row in rows[:2]), rows  # v2: every arm measured
    assert all(row.endswith("| - |") and row.count("| - |") == 1 for row in rows[2:]), rows  # v3: no fine-tune on new
    for section in ("## Gate decisions", "## Weight drift", "## Attention vs FFN output similarity", "## Compute"):
        assert section in report
    assert (project / "report" / "report.html").read_text().count("<table>") == 7  # + the step timings
