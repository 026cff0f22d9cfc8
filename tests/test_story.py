"""`make demo`'s story end to end on the test profile: a copy of the project, its own git + DVC repo, and
the report with every arm, on the at-scale stack (`transpeft stack up --scale`) on free ports with auth
on: PostgreSQL under MLflow and Prefect, MLflow's artifacts and the DVC remote in the S3-compatible
server, the fan-out on a Dask scheduler and two worker processes, MLflow's basic-auth app and Prefect's
auth string. About 4 minutes."""

from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import browser
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
    params["gate"].update(retune_steps=5, distill_steps=5, prompts_per_task=16)  # the shipped strategies, short
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    ports = {name: free_port() for name in ("PREFECT_PORT", "MLFLOW_PORT", "TRANSPEFT_WEBHOOK_PORT",
                                            "TRANSPEFT_POSTGRES_PORT", "TRANSPEFT_S3_PORT", "TRANSPEFT_DASK_PORT")}
    for key in ("TRANSPEFT_STACK_DIR", "MLFLOW_STORE_DIR", "TRANSPEFT_WEBHOOK_SECRET", "MLFLOW_BACKEND_STORE_URI",
                "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", "TRANSPEFT_BIND_HOST",
                "MLFLOW_HOST", "MLFLOW_TRACKING_PASSWORD_FILE", "PREFECT_API_AUTH_STRING_FILE"):
        monkeypatch.delenv(key, raising=False)
    # With auth on: every step, the worker's flow runs and the webhook receiver sign in with these.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets.token_urlsafe(16))
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", f"admin:{secrets.token_urlsafe(16)}")
    # At scale. PostgreSQL runs as the postgres user when we are root: its data outside pytest's 0700 folders.
    postgres = Path(tempfile.mkdtemp(prefix="story-postgres-"))
    for key, value in {"TRANSPEFT_SCALE": "1", "TRANSPEFT_POSTGRES_DIR": str(postgres), **stack.S3_CREDENTIALS}.items():
        monkeypatch.setenv(key, value)
    for key, value in {**ports, "PREFECT_API_URL": f"http://127.0.0.1:{ports['PREFECT_PORT']}/api",
                       "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['MLFLOW_PORT']}",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, str(value))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    local = stack.Stack.find(root)
    (local.state / "logs").mkdir(parents=True)
    stack.start_s3(local, say=lambda line: None)  # the data step pushes to it before the story starts the stack
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"],
                    ["dvc", "remote", "add", "-d", "s3", f"s3://{stack.BUCKET}/dvc"],
                    ["dvc", "remote", "modify", "s3", "endpointurl", local.s3_url], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)
    try:
        yield root
    finally:
        stack.down(local, say=lambda line: None, timeout=10)
        shutil.rmtree(postgres, ignore_errors=True)


def test_the_story_revalidates_v2_and_v3_by_itself_and_reports_every_arm(project):
    done = subprocess.run([sys.executable, "-m", "transpeft.cli", "story", "--report", "report"], cwd=project,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for step in ("data", "bases", "stack", "v1", "v2", "v3", "reference", "report"):
        assert f"== {step}: done in" in done.stdout
    assert "the event started flow run" in done.stdout and "Where to look:" in done.stdout
    local = stack.Stack.find(project)
    assert all(row["running"] for row in stack.status(local).values()), stack.format_status(stack.status(local))

    registry = Registry(os.environ["MLFLOW_TRACKING_URI"])
    fleet = {name: {r.base_version for r in rows} for name, rows in registry.adapters().items()}
    flagged = {r.base_version for rows in registry.adapters().values() for r in rows if r.status == "failed-gate"}
    # A base whose revalidation flagged an adapter says so; every other one is plainly done.
    assert [(b.version, b.revalidation) for b in registry.bases("demo")] == [
        (v, "done with failures" if v in flagged else "done") for v in ("v1", "v2", "v3")]
    assert fleet == {f"{task}-{run}": {"v1", "v2", "v3"} for task in ("reverse", "add")
                     for run in ("plain-v1", "transpeft-v1")}

    # The review at a glance, in a real browser: one adapter's page in the MLflow UI puts its scores on
    # v1, v2 and v3 in one table (its description, rewritten at every registration).
    assert browser.chromium(), "this test needs Chromium: apt-get install chromium (.ci/run installs it)"
    name, versions = "reverse-transpeft-v1", registry.adapter_versions("reverse-transpeft-v1")
    login = base64.b64encode(f"admin:{os.environ['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()
    shot = Path(os.environ.get("TRANSPEFT_SCREENSHOT") or project / "adapter_page.png")
    text = browser.render(f"{os.environ['MLFLOW_TRACKING_URI']}/#/models/adapter-{name}", shot,
                          headers={"Authorization": f"Basic {login}"}, wait_for="demo/v3\t")
    rows = [line.split("\t") for line in text.splitlines() if line.startswith("demo/v")]
    assert [row[:4] for row in rows] == [[f"demo/{r.base_version}", r.model_version, r.status,
                                          "yes" if r.serving else "no"] for r in versions], text
    assert [f"{r.metrics['reverse']:.3f}" in row for r, row in zip(versions, rows)] == [True] * 3, text
    assert shot.stat().st_size > 20_000

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
    for version in ("v2", "v3"):  # each adapter, each strategy of the gate's order, what carried it and its labels
        section = report.split(f"## v1 -> {version}: how each adapter was carried over")[1].split("\n## ")[0]
        header, _, *carried = [line for line in section.splitlines() if line.startswith("|")]
        assert header == ("| adapter | from | direct | scaled | distill | retune | carried by | labels needed "
                          "| used |"), header
        assert len(carried) == 4 and all(row.split(" | ")[7] in ("yes", "no", "-") for row in carried), carried
    assert (project / "report" / "report.html").read_text().count("<table>") == 9  # + the step timings

    # At scale: the records in PostgreSQL, the files in S3, the per-adapter tasks on the Dask workers.
    import psycopg2

    counts = {}
    for database, table in (("mlflow", "model_versions"), ("prefect", "flow_run")):
        with psycopg2.connect(host="127.0.0.1", port=local.postgres_port, user="transpeft", dbname=database) as db:
            with db.cursor() as cursor:
                cursor.execute(f"SELECT count(*) FROM {table}")
                counts[database] = cursor.fetchone()[0]
    assert counts["mlflow"] >= 3 + 4 * 3 and counts["prefect"] >= 4, counts  # 3 bases, 4 adapters on each
    keys = [o["Key"] for page in stack.s3_client(local).get_paginator("list_objects_v2").paginate(Bucket=stack.BUCKET)
            for o in page.get("Contents", [])]
    assert any(k.startswith("mlflow/") and k.endswith("adapter_model.safetensors") for k in keys), keys[:20]
    assert any(k.startswith("dvc/") for k in keys), keys[:20]
    ran = {worker: local.log_file(worker).read_text() for worker in stack.DASK_WORKERS}
    assert all(re.search(r"Task run '.*' - Finished in state Completed", log) for log in ran.values()), ran

    # The data come back from the S3 remote into an empty cache.
    tasks = sorted(p.name for p in (project / "pipeline" / "data").iterdir() if p.is_dir())
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "pipeline" / "data")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    pulled = subprocess.run(["dvc", "pull", "prepare"], cwd=project, env=env, capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert sorted(p.name for p in (project / "pipeline" / "data").iterdir() if p.is_dir()) == tasks
    assert len(tasks) >= 2
