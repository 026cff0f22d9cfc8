"""The MLflow registry and runs against a real tracking server on 127.0.0.1."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from servers import free_port
from transpeft.bases import BaseRef, load_base
from transpeft.data import load_tasks
from transpeft.demo.family import build_demo_family
from transpeft.demo.tasks import build_demo_tasks
from transpeft.methods import MethodConfig
from transpeft.params import Gate
from transpeft.revalidate import close_revalidation, open_revalidation, plan_folders, record_outcome, revalidate
from transpeft.tracking import (AdapterRecord, NotRegistered, Registry, RegistryConflict, TrackingUnavailable,
                                adapter_description, verdict)
from transpeft.train import TrainConfig, train_adapter

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    build_demo_family(root / "tiny", profile="test", progress=False)
    build_demo_tasks(root / "data", n_train=32, n_eval=8)
    return root


def base(family, version):
    return load_base(BaseRef(str(family / "tiny" / version)))


def test_base_registration_is_idempotent_and_refuses_other_contents(mlflow_server, family):
    registry = Registry(mlflow_server.url)
    _, _, v1 = base(family, "v1")
    first = registry.register_base(v1)
    assert registry.register_base(v1) == first
    with pytest.raises(RegistryConflict, match="register the changed weights under a new version name"):
        registry.register_base(replace(v1, fingerprint="sha256:changed"))
    with pytest.raises(NotRegistered, match="parent base tiny/v0 is not registered"):
        registry.register_base(base(family, "v2")[2], parent="v0")
    assert [(b.family, b.version) for b in registry.bases("tiny")] == [("tiny", "v1")]
    version = registry.client.get_model_version("base-tiny", first.model_version)
    assert version.tags["fingerprint"] == v1.fingerprint and version.tags["status"] == "ready"
    assert registry.client.get_model_version_by_alias("base-tiny", "base-v1").version == first.model_version


def test_a_failed_registration_leaves_nothing_that_looks_valid(mlflow_server, family, monkeypatch):
    registry = Registry(mlflow_server.url)
    v3 = replace(base(family, "v3")[2], family="flaky")

    def broken(*args, **kwargs):
        raise MlflowException("registry went away")

    monkeypatch.setattr(registry.client, "set_registered_model_alias", broken)
    with pytest.raises(MlflowException, match="registry went away"):
        registry.register_base(v3)
    assert registry.bases("flaky") == []

    def v3_versions():
        return [v for v in registry.client.search_model_versions("name = 'base-flaky'")
                if v.tags.get("base_version") == "v3"]

    assert [v.tags["status"] for v in v3_versions()] == ["registering"]  # the webhook receiver skips it
    monkeypatch.undo()  # the registry is back: registering again finishes that version, no second one
    again = registry.register_base(v3)
    assert [(v.version, v.tags["status"]) for v in v3_versions()] == [(again.model_version, "ready")]
    assert registry.client.get_run(v3_versions()[0].run_id).info.status == "FINISHED"


def test_a_registration_left_registering_by_a_crash_is_finished_by_the_reconciler(mlflow_server, family):
    """A process killed between creating a base version and making it ready leaves status "registering";
    once it is old enough to be no live registration, the reconciler's sweep makes it ready."""
    registry = Registry(mlflow_server.url)
    _, _, v2 = base(family, "v2")
    v2 = replace(v2, family="stuck")
    run = registry.start_run("register", "register base stuck/v2 (killed)")
    registry._ensure_model("base-stuck", {}, "")
    registry._create_version("base-stuck", run, f"runs:/{run}/base", {
        "base_version": "v2", "fingerprint": v2.fingerprint, "source": v2.source, "status": "registering"}, "")
    assert registry.bases("stuck") == [] and registry.finish_stuck_registrations("stuck") == []  # too recent
    (finished,) = registry.finish_stuck_registrations("stuck", min_age_s=0)
    assert (finished.version, finished.fingerprint) == ("v2", v2.fingerprint)
    assert registry.bases("stuck") == [finished] and registry.register_base(v2) == finished


def test_adapters_are_tracked_per_base_version(mlflow_server, family, tmp_path):
    registry = Registry(mlflow_server.url)
    model, tokenizer, v1 = base(family, "v1")
    registry.register_base(v1)
    tasks = load_tasks(family / "data", ["reverse", "sort"])
    out = tmp_path / "support-bot"
    _, manifest, _ = train_adapter(model, tokenizer, v1, tasks, MethodConfig(r=4),
                                   TrainConfig(steps=3, batch_size=8, p_c=0.1), out, progress=False)

    run_id = registry.log_training("support-bot", out, manifest)
    run = registry.client.get_run(run_id)
    assert run.data.tags["dataset_hash"] == manifest.dataset_hash and run.data.params["p_c"] == "0.1"
    assert len(registry.client.get_metric_history(run_id, "loss")) == 3
    assert {a.path for a in registry.client.list_artifacts(run_id, "adapter")} >= {
        "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/transpeft.json"}

    record = registry.register_adapter("support-bot", out, v1, "trained", manifest.metrics, run_id)
    assert registry.register_adapter("support-bot", out, v1, "trained", manifest.metrics, run_id) == record
    tags = registry.client.get_model_version("adapter-support-bot", record.model_version).tags
    assert (tags["base_version"], tags["status"], tags["p_c"], tags["dataset_hash"]) == (
        "v1", "trained", "0.1", manifest.dataset_hash)
    assert record.serving and record.metrics.keys() == {"reverse", "sort"}

    _, _, v2 = base(family, "v2")
    with pytest.raises(NotRegistered, match="base tiny/v2 is not in the registry"):
        registry.register_adapter("support-bot", out, v2, "transferred", manifest.metrics, run_id)


def test_carrying_folders_over_makes_one_parent_run_a_child_per_adapter_and_a_report(mlflow_server, family,
                                                                                     tmp_path):
    """The lifecycle on hand-picked folders (what `transpeft transfer --track` runs)."""
    registry = Registry(mlflow_server.url)
    model, tokenizer, v1 = base(family, "v1")
    registry.register_base(v1)
    tasks = load_tasks(family / "data", ["reverse"])
    train_adapter(model, tokenizer, v1, tasks, MethodConfig(r=4), TrainConfig(steps=2, batch_size=8),
                  tmp_path / "good", progress=False)
    (tmp_path / "broken").mkdir()  # an adapter folder with nothing in it

    model, tokenizer, v2 = base(family, "v2")
    registry.register_base(v2, parent="v1")
    slot = SimpleNamespace(model=model, tokenizer=tokenizer, info=v2)
    folders = [tmp_path / "good", tmp_path / "broken"]
    plan = plan_folders(v2, folders)
    parent = open_revalidation(registry, v2, plan)
    gate = Gate(min_retention=0.0, min_score=0.0, beat_zero_shot=False, strategies=("direct",))
    outcomes = [revalidate(slot, f, c, family / "data", gate, tmp_path) for f, c in zip(folders, plan.candidates)]
    assert [o.decision for o in outcomes] == ["passed", "failed"] and "incomplete" in outcomes[1].reasons[0]
    for outcome in outcomes:
        record_outcome(registry, parent, v2, outcome)
    summary = close_revalidation(registry, parent, v2, plan, outcomes, crashed=[], whole_family=False)
    assert (summary.passed, summary.failed) == (1, 1)

    children = registry.client.search_runs([registry.client.get_run(parent).info.experiment_id],
                                           f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    report = {a.path for a in registry.client.list_artifacts(parent, "report")}
    assert report == {"report/transfer_report.md", "report/transfer_report.csv", "report/transfer_heatmap.png",
                      "report/gate_decisions.md"}
    good = registry.adapter_versions("good")
    assert [(r.base_version, r.status, r.transferred_from) for r in good] == [("v2", "transferred", "v1")]
    # A folder has no registered files to name: they are stored in its child run, the version's run.
    assert registry.run(good[0].run_id).data.tags["mlflow.parentRunId"] == parent
    assert "adapter/adapter_model.safetensors" in {a.path for a in registry.client.list_artifacts(good[0].run_id,
                                                                                                   "adapter")}
    assert registry.adapter_versions("broken") == []
    assert registry.base(v2.family, "v2").revalidation is None  # two folders are not the family's revalidation


def test_an_unreachable_server_is_an_error_never_a_local_fallback():
    with pytest.raises(TrackingUnavailable, match="is not reachable"):
        Registry(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TrackingUnavailable, match="is not a server"):
        Registry("file:///tmp/mlruns")


def test_cli_registers_bases_trains_transfers_and_lists_side_by_side(mlflow_server, family, tmp_path, capsys,
                                                                     monkeypatch):
    """The commands a user types, called in-process (tests/test_cli.py runs the real executable)."""
    from transpeft.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)

    def cli(*args, check=True):
        capsys.readouterr()
        returncode = main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert not check or returncode == 0, err[-2000:]
        return SimpleNamespace(returncode=returncode, stdout=out, stderr=err)

    bases = family / "tiny"
    common = ["--data", family / "data", "--tasks", "sort", "--steps", 2, "--batch-size", 8]
    refused = cli("train", "--base", bases / "v3", *common, "--out", tmp_path / "a", "--track", check=False)
    assert refused.returncode == 2 and "base tiny/v3 is not in the registry" in refused.stderr
    assert not (tmp_path / "a").exists()  # refused before training

    cli("bases", "register", "--base", bases / "v1", "--no-event")  # events: tests/test_events.py
    cli("train", "--base", bases / "v1", *common, "--out", tmp_path / "faq-bot", "--track")
    cli("bases", "register", "--base", bases / "v2", "--parent", "v1", "--no-event")
    # Judged by params.yaml's gate: two training steps fail it, so the adapter is kept on v2 unserved.
    moved = json.loads(cli("transfer", tmp_path / "faq-bot", "--to", bases / "v2", "--data", family / "data", "--track",
                           "--json").stdout)
    assert moved["adapters"][str(tmp_path / "faq-bot")]["decision"] == "flagged" and moved["run_id"]
    listed = json.loads(cli("adapters", "list", "--json").stdout)["faq-bot"]
    assert [(r["base_version"], r["status"], r["serving"]) for r in listed] == [
        ("v1", "trained", True), ("v2", "failed-gate", False)]
    text = cli("adapters", "list").stdout
    assert "faq-bot" in text and "trained*" in text and "failed-gate" in text and "failed-gate*" not in text
    assert "tiny" in cli("bases", "list").stdout

    # The adapter's page in the MLflow UI: both base versions side by side, each version's verdict.
    client = MlflowClient(mlflow_server.url)
    table = client.get_registered_model("adapter-faq-bot").description.splitlines()
    assert [row.split(" | ")[:4] for row in table if row.startswith("| tiny/")] == [
        ["| tiny/v1", "1", "trained", "yes"], ["| tiny/v2", "2", "failed-gate", "no"]]
    v2 = client.get_model_version("adapter-faq-bot", "2").description
    assert v2.startswith("carried over from v1 to tiny/v2, kept unserved: ") and "Exact match: sort " in v2


def test_an_adapters_description_puts_every_base_version_side_by_side():
    rows = [AdapterRecord("faq", "demo", "v1", "trained", None, {"sort": 0.9, "reverse": 0.8}, "1", True,
                          trained_on="v1"),
            AdapterRecord("faq", "demo", "v2", "retuned", "v1", {"sort": 0.85}, "2", True, trained_on="v2",
                          gate="sort: retention 0.52 | below 0.9; re-tuned for 40 steps: passes"),
            AdapterRecord("faq", "demo", "v3", "failed-gate", "v2", {"sort": 0.2, "reverse": 0.1}, "3", False,
                          gate="sort: retention 0.24"),
            AdapterRecord("faq", "demo", "v4", "distilled", "v3", {"sort": 0.8}, "4", True, trained_on="v4",
                          gate="sort: retention 0.3; distill: passes", used="512 prompts")]
    table = adapter_description("faq", rows).splitlines()
    assert table[2] == ("| base | version | status | served | reverse (exact match) | sort (exact match) | came from "
                        "| gate |")
    assert table[4:] == [
        "| demo/v1 | 1 | trained | yes | 0.800 | 0.900 | trained on v1 |  |",
        "| demo/v2 | 2 | retuned | yes |  | 0.850 | carried over from v1, re-tuned on v2 | sort: retention 0.52 \\| "
        "below 0.9; re-tuned for 40 steps: passes |",
        "| demo/v3 | 3 | failed-gate | no | 0.100 | 0.200 | carried over from v2 | sort: retention 0.24 |",
        "| demo/v4 | 4 | distilled | yes |  | 0.800 | carried over from v3, distilled from the old base on v4 (used "
        "512 prompts) | sort: retention 0.3; distill: passes |"]
    assert [verdict(r) for r in rows] == [
        "trained on demo/v1. Exact match: reverse 0.800, sort 0.900",
        "carried over from v1 to demo/v2, failed the gate, re-tuned: it passes. Exact match: sort 0.850",
        "carried over from v2 to demo/v3, kept unserved: sort: retention 0.24. Exact match: reverse 0.100, sort 0.200",
        "carried over from v3 to demo/v4, failed the gate, distilled from the old base (used 512 prompts): it passes. "
        "Exact match: sort 0.800"]
    many = adapter_description("faq", [replace(rows[2], model_version=str(i), gate="x" * 240) for i in range(60)])
    assert len(many) <= 5000 and many.endswith("(table cut short)")


def test_a_lent_base_must_still_be_the_registered_one(family):
    from transpeft.bases import BaseLoadError, lend_base

    ref = BaseRef(str(family / "tiny" / "v1"))
    with pytest.raises(BaseLoadError, match="is not the registered one"):
        with lend_base(ref, "sha256:registered-before-the-weights-changed"):
            pass
    with lend_base(ref, load_base(ref)[2].fingerprint) as slot:
        assert slot.info.version == "v1"
