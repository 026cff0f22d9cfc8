"""prefect.yaml's Docker and Kubernetes work-pool variants are accepted by `prefect deploy`: each is one
line to switch (``work_pool: &pool`` in its definitions), and needs no Docker daemon or cluster to deploy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from servers import deploy, prefect_api

from transpeft.events import TRANSFER_DEPLOYMENT

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variant,pool,image", [
    ("docker", "transpeft-docker", "transpeft:latest"),
    ("kubernetes", "transpeft-kubernetes", "registry.example.com/transpeft:latest"),
])
def test_the_deployments_move_to_another_pool_with_one_line(tmp_path, prefect_server, monkeypatch, variant, pool,
                                                            image):
    project = tmp_path / "project"
    for folder in ("flows", "tasks"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "params.yaml", project)
    text = (ROOT / "prefect.yaml").read_text()
    assert text.count("<<: *local-pool") == 1
    (project / "prefect.yaml").write_text(text.replace("<<: *local-pool", f"<<: *{variant}-pool"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)

    deploy(prefect_server, tmp_path / "home", TRANSFER_DEPLOYMENT, project=project, pool_type=variant)

    deployment = prefect_api(prefect_server, f"/deployments/name/{TRANSFER_DEPLOYMENT}")
    assert deployment["work_pool_name"] == pool
    variables = deployment["job_variables"]
    assert variables["image"] == image
    # The clients' settings come from the deployer's environment, resolved when it deploys.
    assert variables["env"] == {"PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"}
    assert deployment["global_concurrency_limit"]["limit"] == 1  # the rest of its definition goes along
    assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(project)
