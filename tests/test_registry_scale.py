"""The registry at the fleet's scale: past MLflow's first page of 100 registered models."""

from __future__ import annotations

import pytest

from transpeft.bases import BaseRef, describe_base, load_base
from transpeft.data import load_tasks
from transpeft.demo.family import build_demo_family
from transpeft.demo.tasks import build_demo_tasks
from transpeft.methods import MethodConfig
from transpeft.nightly import served
from transpeft.revalidate import plan
from transpeft.tracking import Registry
from transpeft.train import TrainConfig, train_adapter

pytestmark = pytest.mark.server
FLEET = 250


def test_plan_and_the_nightly_run_see_every_adapter_of_a_fleet_of_250(mlflow_server, tmp_path):
    build_demo_family(tmp_path / "tiny", profile="test", progress=False)
    build_demo_tasks(tmp_path / "data", n_train=16, n_eval=4)
    registry = Registry(mlflow_server.url)
    model, tokenizer, v1 = load_base(BaseRef(str(tmp_path / "tiny" / "v1")))
    registry.register_base(v1)
    registry.register_base(describe_base(BaseRef(str(tmp_path / "tiny" / "v2")))[2], parent="v1")
    out = tmp_path / "adapter"
    _, manifest, _ = train_adapter(model, tokenizer, v1, load_tasks(tmp_path / "data", ["reverse"]),
                                   MethodConfig(r=2), TrainConfig(steps=1, batch_size=4), out, progress=False)
    run_id = registry.log_training("fleet", out, manifest)
    first = registry.register_adapter("fleet-000", out, v1, "trained", manifest.metrics, run_id)
    tags = registry.adapter_tags(first)
    for i in range(1, FLEET):  # the rest as metadata, with the same tags: what counts here is reading them back
        name = f"adapter-fleet-{i:03d}"
        registry.client.create_registered_model(name)
        version = registry.client.create_model_version(name, f"runs:/{run_id}/adapter", run_id, tags=tags)
        registry.client.set_registered_model_alias(name, "on-v1", version.version)

    fleet = registry.adapters()
    assert len(fleet) == FLEET and all(len(versions) == 1 for versions in fleet.values())
    assert len(plan(registry, "tiny", "v2").candidates) == FLEET
    assert len(served(registry, "tiny")[("tiny", "v1")]) == FLEET
