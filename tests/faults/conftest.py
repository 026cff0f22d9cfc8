"""The fault-injection suite's world: real servers and a small fleet (recovery.py holds the checks).

Each test gets its own base family (``fleet``): bases v1 and v2 registered, three adapters trained
once per session and registered on v1 under names of their own.

What each test measured goes to ``measured`` and, when TRANSPEFT_FAULTS_REPORT names a file, into
that JSON (``make faults`` writes tests/faults/results.json, the README's table).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from faults.recovery import Fleet

from transpeft.adapters import read_manifest
from transpeft.bases import BaseRef, describe_base
from transpeft.data import load_tasks
from transpeft.demo.family import build_demo_family
from transpeft.demo.tasks import build_demo_tasks
from transpeft.methods import MethodConfig
from transpeft.tracking import Registry
from transpeft.train import TrainConfig, train_adapter
from transpeft.transfer import unload_adapter


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The test family's bases and tasks, and three adapters trained on v1 (a few steps each)."""
    from transpeft.bases import load_base

    root = tmp_path_factory.mktemp("faults")
    build_demo_family(root / "bases", profile="test", progress=False)
    build_demo_tasks(root / "data", n_train=24, n_eval=8)
    model, tokenizer, v1 = load_base(BaseRef(str(root / "bases" / "v1")))
    for name, task in (("a", "reverse"), ("b", "sort"), ("c", "reverse")):
        trained, _, _ = train_adapter(model, tokenizer, v1, load_tasks(root / "data", [task]), MethodConfig(r=2),
                                      TrainConfig(steps=3, batch_size=8, seed=ord(name)), root / "adapters" / name,
                                      progress=False)
        model = unload_adapter(trained, "lora")
    return root


@pytest.fixture
def fleet(world, mlflow_server, request) -> Fleet:
    family = request.node.name.removeprefix("test_").replace("_", "-")[:40]
    registry = Registry(mlflow_server.url)
    bases = {v: describe_base(BaseRef(str(world / "bases" / v), family=family))[2] for v in ("v1", "v2")}
    registry.register_base(bases["v1"])
    names = []
    for folder in sorted((world / "adapters").iterdir()):
        name = f"{family}-{folder.name}"
        manifest = read_manifest(folder)
        run = registry.log_training(name, folder, manifest)
        registry.register_adapter(name, folder, bases["v1"], "trained", manifest.metrics, run, manifest=manifest)
        names.append(name)
    registry.register_base(bases["v2"], parent="v1")
    return Fleet(family, world, registry, names)


MEASURED: list[dict] = []


@pytest.fixture
def measured(request):
    """Record what a fault test measured: measured(fault=..., promise=..., **figures)."""
    def record(**row):
        MEASURED.append({"test": request.node.name, **row})
    return record


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("TRANSPEFT_FAULTS_REPORT")
    if out and MEASURED:
        Path(out).write_text(json.dumps(MEASURED, indent=2) + "\n")


