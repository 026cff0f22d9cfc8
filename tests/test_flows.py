"""The Prefect flows, their bodies called directly on the test family, against real servers.

A real MLflow tracking server and a real Prefect server (both on 127.0.0.1): finetune-adapters
trains and registers the fleet on v1, transfer-on-base-update carries it to v2 and v3 under
different gate policies, nightly-regression reconciles and checks. Each flow run is a real Prefect
flow run; only deployment runs are not executed here (tests/test_events.py covers those).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode

from flows import fanout_runner
from flows.finetune_adapters import finetune_adapters
from flows.nightly_regression import Regressions, nightly_regression
from flows.register_base import register_base
from flows.transfer_on_base_update import transfer_on_base_update
from tasks import crash_or_transient_io, transient_io
from transpeft.adapters import read_manifest
from transpeft.bases import BaseRef, load_base
from transpeft.demo.family import build_demo_family
from transpeft.demo.tasks import build_demo_tasks
from transpeft.params import Fanout
from transpeft.tracking import FINISHED, Registry
from transpeft.train import TrainingDiverged

pytestmark = pytest.mark.server

GATE_PASS_ALL = {"min_retention": 0.0, "min_score": 0.0, "beat_zero_shot": False, "strategies": ["direct"],
                 "retune_steps": 20}
GATE_FAIL_ALL = {**GATE_PASS_ALL, "min_score": 1.01}


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_server, prefect_api):
    """A project with the test family v1-v3, two tasks, and params.yaml pointing at the servers."""
    root = tmp_path_factory.mktemp("project")
    build_demo_family(root / "bases", profile="test", progress=False)
    build_demo_tasks(root / "data", n_train=48, n_eval=8)
    registry = Registry(mlflow_server.url)
    registry.register_base(load_base(BaseRef(str(root / "bases" / "v1"), family="demo"))[2])
    return root


def write_params(root: Path, uri: str, gate: dict, name: str) -> str:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["bases"]["sources"] = {v: str(root / "bases" / v) for v in params["bases"]["versions"]}
    params["train"]["tasks"] = ["reverse", "sort"]
    params["train"]["schedule"] = {"steps": 30, "batch_size": 8, "lr": 0.01, "warmup": 0.1, "seed": 0}
    params["train"]["method"]["r"] = 4
    params["train"]["runs"] = {"plain-v1": {"base": "v1"}, "tp-v1": {"base": "v1", "p_c": 0.1}}
    params["gate"] = gate
    params["tracking"] = {"uri": uri}
    params["placement"] = {"device": "cpu", "dtype": "bf16"}  # each flow step must honour it
    path = root / name
    path.write_text(yaml.safe_dump(params))
    return str(path)


def register(registry: Registry, root: Path, version: str, parent: str):
    return registry.register_base(load_base(BaseRef(str(root / "bases" / version), family="demo"))[2], parent)


def test_finetune_trains_and_registers_the_grid_once(project, mlflow_server):
    params = write_params(project, mlflow_server.url, GATE_PASS_ALL, "pass.yaml")
    first = finetune_adapters(version="v1", data_dir=str(project / "data"), params_file=params)
    assert sorted(r["adapter"] for r in first) == ["reverse-plain-v1", "reverse-tp-v1", "sort-plain-v1", "sort-tp-v1"]
    assert not any(r["skipped"] for r in first)
    again = finetune_adapters(version="v1", data_dir=str(project / "data"), params_file=params)
    assert all(r["skipped"] for r in again)
    registry = Registry(mlflow_server.url)
    records = registry.adapters()
    assert all(len(rows) == 1 and rows[0].status == "trained" and rows[0].serving for rows in records.values())
    assert {registry.client.get_run(rows[0].run_id).data.params["placement"] for rows in records.values()} == \
        {"cpu bfloat16"}


def test_transfer_registers_passing_adapters_once(project, mlflow_server):
    registry = Registry(mlflow_server.url)
    params = write_params(project, mlflow_server.url, GATE_PASS_ALL, "pass.yaml")
    announced = register_base(str(project / "bases" / "v2"), "demo", "v2", parent="v1", params_file=params)
    assert announced["model_version"] == registry.base("demo", "v2").model_version and announced["event_id"]
    summary = transfer_on_base_update("demo", "v2", str(project / "data"), params)
    assert (summary["passed"], summary["retuned"], summary["flagged"], summary["failed"]) == (4, 0, 0, 0)
    assert summary["state"] == "done"
    children = registry.client.search_runs([registry._experiment("transfer")], "tags.base_version = 'v2'")
    by_adapter = {r.data.tags["adapter"]: r for r in children if "adapter" in r.data.tags}
    for name, rows in registry.adapters().items():
        (on_v1,) = [r for r in rows if r.base_version == "v1"]
        (on_v2,) = [r for r in rows if r.base_version == "v2"]
        assert on_v2.status == "transferred" and on_v2.serving and on_v2.transferred_from == "v1"
        # Carried over unchanged: the v2 version names the trained files, and no copy of them is stored.
        assert (on_v2.run_id, on_v2.source) == (on_v1.run_id, on_v1.source)
        assert on_v2.source.startswith("mlflow-artifacts:/") and on_v2.source.endswith("/adapter")
        assert registry.adapter_tags(on_v2)["revalidation_run"] == by_adapter[name].info.run_id
        assert registry.client.list_artifacts(by_adapter[name].info.run_id) == []
    assert registry.base("demo", "v2").revalidation == "done"
    assert {r.data.tags.get("placement") for r in by_adapter.values()} == {"cpu bfloat16"}

    again = transfer_on_base_update("demo", "v2", str(project / "data"), params)
    assert again["already_done"] == 4 and again["passed"] == 0
    assert all(len(rows) == 2 for rows in registry.adapters().values())  # no duplicate versions


def test_failing_gate_flags_and_a_broken_adapter_fails_alone(project, mlflow_server):
    registry = Registry(mlflow_server.url)
    register(registry, project, "v3", "v2")
    # Corrupt one adapter's stored files (its v2 version's, which are its v1 version's: it was carried over
    # unchanged): the weights no longer match the manifest.
    broken = registry.adapter_versions("sort-plain-v1")[-1]
    bad = project / "corrupt" / "adapter_model.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"not a safetensors file")
    registry.client.log_artifact(broken.run_id, str(bad), "adapter")  # overwrites the stored weights

    params = write_params(project, mlflow_server.url, GATE_FAIL_ALL, "fail.yaml")
    summary = transfer_on_base_update("demo", "v3", str(project / "data"), params)
    assert (summary["passed"], summary["flagged"], summary["failed"]) == (0, 3, 1)
    rows = {name: [r for r in records if r.base_version == "v3"] for name, records in registry.adapters().items()}
    assert rows["sort-plain-v1"] == []  # could not be evaluated: nothing registered
    for name in ("reverse-plain-v1", "reverse-tp-v1", "sort-tp-v1"):
        (flagged,) = rows[name]
        assert flagged.status == "failed-gate" and not flagged.serving and flagged.transferred_from == "v2"
    decisions = registry.client.download_artifacts(summary["run_id"], "report/gate_decisions.md")
    text = Path(decisions).read_text()
    assert "sort-plain-v1 | v2 | **failed**" in text and "exact match" in text


def test_fanout_on_a_local_dask_cluster(project, mlflow_server):
    """The same revalidation with params.yaml's fanout.task_runner = dask: tasks run in worker processes."""
    from prefect_dask import DaskTaskRunner

    registry = Registry(mlflow_server.url)
    # v4 created straight in MLflow, as a user would in the UI: the flow adopts it from its source tag.
    shutil.copytree(project / "bases" / "v3", project / "bases" / "v4")
    run = registry.client.create_run(registry._experiment("register")).info.run_id
    registry.client.create_model_version("base-demo", source=f"runs:/{run}/base", run_id=run, tags={
        "base_version": "v4", "source": str(project / "bases" / "v4"), "parent": "v3"})
    params = write_params(project, mlflow_server.url, GATE_PASS_ALL, "pass.yaml")
    runner = fanout_runner(Fanout(task_runner="dask", max_workers=2))
    assert isinstance(runner, DaskTaskRunner)
    summary = transfer_on_base_update.with_options(task_runner=runner)("demo", "v4", str(project / "data"), params)
    # Each from its latest served version (v2: v3's were flagged); the one broken on v2 fails alone.
    assert (summary["passed"], summary["failed"]) == (3, 1)
    assert {r.transferred_from for rows in registry.adapters().values() for r in rows if r.base_version == "v4"} == {"v2"}
    adopted = registry.base("demo", "v4")
    assert adopted.fingerprint == registry.base("demo", "v3").fingerprint and adopted.revalidation == "done with failures"


def test_nightly_reconciles_and_reports_regressions(project, mlflow_server):
    registry = Registry(mlflow_server.url)
    params = write_params(project, mlflow_server.url, GATE_PASS_ALL, "pass.yaml")
    # v1 was registered without a revalidation run: the reconciler runs it (nothing to carry over).
    assert [b.version for b in registry.bases("demo") if b.revalidation not in FINISHED] == ["v1"]
    # sort-plain-v1's files were broken above: served on v1 and v2 from them, it can no longer be evaluated.
    with pytest.raises(Regressions, match="sort-plain-v1 on demo/v2: cannot be evaluated"):
        nightly_regression(family="demo", data_dir=str(project / "data"), params_file=params)
    assert all(b.revalidation in FINISHED for b in registry.bases("demo"))
    (run,) = registry.client.search_runs([registry._experiment("nightly")])
    assert run.info.status == "FAILED" and run.data.metrics["regressions"] == 2
    assert run.data.metrics["adapters"] == 4 + 4 + 3  # served on v1, v2 and v4
    assert run.data.tags["placement"] == "cpu bfloat16"


@pytest.mark.parametrize("error, retried", [
    (ConnectionError("connection refused"), True),
    (MlflowException("server busy", error_code=ErrorCode.Value("TEMPORARILY_UNAVAILABLE")), True),
    (MlflowException("database is locked"), True),  # a 500, as SQLite under concurrent writers answers
    (MlflowException("no such model", error_code=ErrorCode.Value("RESOURCE_DOES_NOT_EXIST")), False),
    (ValueError("incompatible adapter"), False),
    (TrainingDiverged("loss became nan"), False),
])
def test_tasks_retry_only_transient_io(error, retried):
    from prefect.states import Failed

    assert transient_io(None, None, Failed(data=error)) is retried


@pytest.mark.parametrize("error, retried", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (ConnectionError("connection refused"), True),
    (TrainingDiverged("loss became nan"), False),
    (ValueError("incompatible adapter"), False),
])
def test_compute_retries_crashes_and_transient_io_but_not_bad_adapters(error, retried):
    from prefect.states import Failed

    assert crash_or_transient_io(None, None, Failed(data=error)) is retried


def test_a_crash_is_retried_then_reported_crashed_and_the_reconciler_runs_it_again(project, mlflow_server, monkeypatch):
    """Out of memory while judging one adapter: retried; still failing, it is reported as crashed (not
    incompatible), the base's revalidation stays incomplete, and the nightly reconciler finishes it."""
    import flows.transfer_on_base_update as flow_module
    import tasks.revalidate as judge_module

    registry = Registry(mlflow_server.url)
    shutil.copytree(project / "bases" / "v3", project / "bases" / "v5")
    run = registry.client.create_run(registry._experiment("register")).info.run_id
    registry.client.create_model_version("base-demo", source=f"runs:/{run}/base", run_id=run, tags={
        "base_version": "v5", "source": str(project / "bases" / "v5"), "parent": "v4"})
    attempts: dict[str, int] = {}
    real = judge_module.revalidate

    def out_of_memory(slot, adapter_dir, candidate, *args, **kwargs):
        attempts[candidate.name] = attempts.get(candidate.name, 0) + 1
        if candidate.name == "reverse-plain-v1" or (candidate.name == "sort-tp-v1" and attempts[candidate.name] == 1):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(slot, adapter_dir, candidate, *args, **kwargs)

    monkeypatch.setattr(judge_module, "revalidate", out_of_memory)
    monkeypatch.setattr(flow_module, "judge_adapter", judge_module.judge_adapter.with_options(retry_delay_seconds=0))
    params = write_params(project, mlflow_server.url, GATE_PASS_ALL, "pass.yaml")
    summary = transfer_on_base_update("demo", "v5", str(project / "data"), params)

    assert attempts["reverse-plain-v1"] == 3 and attempts["sort-tp-v1"] == 2  # 2 retries; one passed on its second
    assert summary["state"] == "incomplete"
    assert registry.client.get_run(summary["run_id"]).data.tags["crashed"] == "reverse-plain-v1"
    on_v5 = {name for name, rows in registry.adapters().items() for r in rows if r.base_version == "v5"}
    assert "sort-tp-v1" in on_v5 and "reverse-plain-v1" not in on_v5
    assert registry.base("demo", "v5").revalidation == "incomplete"

    monkeypatch.setattr(judge_module, "revalidate", real)  # the machine is healthy again
    with pytest.raises(Regressions):  # sort-plain-v1, broken on v2, still regresses; v5 is reconciled first
        nightly_regression(family="demo", data_dir=str(project / "data"), params_file=params)
    assert registry.base("demo", "v5").revalidation == "done with failures"  # sort-plain-v1's broken files
    assert "reverse-plain-v1" in {name for name, rows in registry.adapters().items() for r in rows
                                  if r.base_version == "v5"}


def test_transfer_track_and_the_flow_write_the_same_record(project, mlflow_server, tmp_path, capsys):
    """`transpeft transfer --track` and transfer-on-base-update run one lifecycle: twin adapters (the
    same files under two names), one carried over by each, get the same child run and registry version."""
    from transpeft.bases import describe_base
    from transpeft.cli import main as cli

    registry = Registry(mlflow_server.url)
    params = write_params(project, mlflow_server.url, GATE_PASS_ALL, "pass.yaml")
    twin = {v: describe_base(BaseRef(str(project / "bases" / v), family="twin"))[2] for v in ("v1", "v2")}
    registry.register_base(twin["v1"])
    registry.register_base(twin["v2"], parent="v1")
    trained = registry.adapter_versions("reverse-tp-v1")[0]
    files = registry.download_adapter(trained, tmp_path / "download")
    for name in ("twin-cli", "twin-flow"):
        shutil.copytree(files, tmp_path / name)
        manifest = read_manifest(tmp_path / name)
        run = registry.log_training(name, tmp_path / name, manifest)
        registry.register_adapter(name, tmp_path / name, twin["v1"], "trained", manifest.metrics, run)

    assert cli(["transfer", str(tmp_path / "twin-cli"), "--to", str(project / "bases" / "v2"), "--to-family", "twin",
                "--data", str(project / "data"), "--params", params, "--track", "--tracking-uri", mlflow_server.url,
                "--device", "cpu", "--dtype", "bf16", "--json"]) == 0
    capsys.readouterr()
    summary = transfer_on_base_update("twin", "v2", str(project / "data"), params)
    assert (summary["passed"], summary["already_done"]) == (1, 1)  # twin-flow carried over; twin-cli already there

    def record(name: str) -> tuple:
        (version,) = [r for r in registry.adapter_versions(name) if r.base_version == "v2"]
        tags = registry.adapter_tags(version)
        child = registry.run(tags.pop("revalidation_run"))  # the files' run holds no verdict: this one does
        artifacts = sorted(a.path for a in registry.client.list_artifacts(version.run_id, "adapter"))
        return (version.status, version.serving, version.transferred_from, version.metrics,
                tags, child.info.status, artifacts,
                {k: v for k, v in child.data.tags.items() if k != "adapter" and not k.startswith("mlflow.")},
                {k: v for k, v in child.data.metrics.items() if not k.startswith("seconds.")})

    by_cli, by_flow = record("twin-cli"), record("twin-flow")
    assert by_cli == by_flow
    assert by_cli[0] == "transferred" and by_cli[7]["decision"] == "passed" and "zero_shot.reverse" in by_cli[8]


def test_an_adapter_the_gate_fails_as_transferred_is_distilled_from_its_old_base_without_labels(project, mlflow_server,
                                                                                                 tmp_path):
    """gate.strategies [distill]: the flow lends the old base beside the new one, as distillation's teacher; the
    registry records which strategy carried the adapter and that it used no labels."""
    from transpeft.bases import describe_base

    registry = Registry(mlflow_server.url)
    gate = {**GATE_PASS_ALL, "strategies": ["distill"], "distill_steps": 5, "prompts_per_task": 16}
    params = write_params(project, mlflow_server.url, gate, "distill.yaml")
    pupil = {v: describe_base(BaseRef(str(project / "bases" / v), family="pupil"))[2] for v in ("v1", "v2")}
    registry.register_base(pupil["v1"])
    registry.register_base(pupil["v2"], parent="v1")
    files = registry.download_adapter(registry.adapter_versions("sort-tp-v1")[0], tmp_path / "download")
    manifest = read_manifest(files)
    run = registry.log_training("pupil-sort", files, manifest)
    registry.register_adapter("pupil-sort", files, pupil["v1"], "trained", manifest.metrics, run)

    summary = transfer_on_base_update("pupil", "v2", str(project / "data"), params)
    assert (summary["distilled"], summary["flagged"], summary["failed"]) == (1, 0, 0), summary
    (on_v2,) = [r for r in registry.adapter_versions("pupil-sort") if r.base_version == "v2"]
    assert on_v2.status == "distilled" and on_v2.serving and on_v2.used == "16 prompts"
    tags = registry.adapter_tags(on_v2)
    assert (tags["strategy"], tags["labels"], tags["strategy_steps"]) == ("distill", "false", "5")
    assert on_v2.run_id == tags["revalidation_run"]  # new files, stored in the run that made them
    made = read_manifest(registry.download_adapter(on_v2, tmp_path / "distilled"))
    assert made.base.version == "v2" and made.training["strategy"] == "distill"
    assert "distilled from the old base on v2 (used 16 prompts)" in registry.client.get_registered_model(
        "adapter-pupil-sort").description
