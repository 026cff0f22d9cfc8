"""Faults of one adapter or one process during a revalidation: each hurts that adapter alone, and a
second run finishes what a killed one left, registering nothing twice."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest

from faults.recovery import GATE_PASS_ALL, GATE_RETUNE_ALL, PROJECT_ROOT, assert_recovered, half_written
from flows.transfer_on_base_update import transfer_on_base_update

pytestmark = pytest.mark.server


def child_reasons(fleet, run_id: str) -> dict[str, str]:
    """Each adapter's reasons on its child run of the revalidation ``run_id``."""
    runs = fleet.registry.runs("transfer", f"tags.mlflow.parentRunId = '{run_id}'")
    return {r.data.tags["adapter"]: r.data.tags.get("reasons", "") for r in runs}


def test_a_corrupted_and_a_truncated_adapter_artifact_fail_alone(fleet, prefect_api, mlflow_server, measured):
    corrupt, truncated, healthy = fleet.adapters
    store = mlflow_server.log.parent / "artifacts"
    for name, damage in ((corrupt, "flip"), (truncated, "truncate")):
        (record,) = fleet.on("v1")[name]
        (weights,) = store.rglob(f"{record.run_id}/artifacts/adapter/adapter_model.safetensors")
        data = bytearray(weights.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
        else:
            del data[len(data) // 2:]
        weights.write_bytes(bytes(data))

    summary = transfer_on_base_update(fleet.family, "v2", fleet.data, fleet.params(GATE_PASS_ALL))

    counted = assert_recovered(fleet, "v2", summary, failed={corrupt, truncated})
    reasons = child_reasons(fleet, summary["run_id"])
    assert "does not match the checksum" in reasons[corrupt]
    assert "corrupt" in reasons[truncated] and truncated in reasons[truncated]
    assert counted["passed"] == 1 and fleet.on("v2")[healthy][0].serving
    assert summary["state"] == "done with failures"
    assert fleet.registry.base(fleet.family, "v2").revalidation == "done with failures"
    measured(fault="a corrupted and a truncated adapter artifact", promise="that adapter fails alone, with the reason",
             adapters=3, carried=counted["passed"], failed=counted["failed"], lost=counted["lost"],
             duplicated=counted["duplicated"])


def test_nan_during_retuning_flags_the_adapter_and_the_base_is_done_with_failures(fleet, prefect_api, monkeypatch,
                                                                                 measured):
    import transpeft.strategies as strategies

    real = strategies.retune_config
    monkeypatch.setattr(strategies, "retune_config", lambda *args: replace(real(*args), lr=1e30))
    summary = transfer_on_base_update(fleet.family, "v2", fleet.data, fleet.params(GATE_RETUNE_ALL))

    counted = assert_recovered(fleet, "v2", summary, served=set())
    assert counted["flagged"] == 3 and {r[0].status for r in fleet.on("v2").values()} == {"failed-gate"}
    assert all("re-tuning diverged" in why for why in child_reasons(fleet, summary["run_id"]).values())
    assert summary["state"] == "done with failures"
    assert fleet.registry.run(summary["run_id"]).data.tags["state"] == "done with failures"
    assert fleet.registry.base(fleet.family, "v2").revalidation == "done with failures"
    measured(fault="NaN during re-tuning", promise="flagged with the reason; the base says done with failures",
             adapters=3, flagged=counted["flagged"], lost=counted["lost"], duplicated=counted["duplicated"])


KILL_BETWEEN_VERSION_AND_ALIAS = textwrap.dedent("""
    import os, sys
    from transpeft.tracking import Registry
    from flows.transfer_on_base_update import transfer_on_base_update

    # The first adapter version is created, then the process dies before its alias, as under SIGKILL.
    Registry.serve = lambda self, record: os._exit(9)
    transfer_on_base_update(sys.argv[1], "v2", sys.argv[2], sys.argv[3])
""")


def test_a_process_killed_between_version_and_alias_is_finished_by_the_next_run(fleet, prefect_api, measured):
    params = fleet.params(GATE_PASS_ALL)
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_VERSION_AND_ALIAS, fleet.family, fleet.data, params],
                            cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-3000:]
    before = fleet.on("v2")
    half = sorted(name for name, rows in before.items() if any(r.half_registered for r in rows))
    assert half and all(len(rows) <= 1 for rows in before.values())

    started = time.monotonic()
    summary = transfer_on_base_update(fleet.family, "v2", fleet.data, params)
    recovery = time.monotonic() - started

    counted = assert_recovered(fleet, "v2", summary)
    assert summary["already_done"] == sum(len(rows) for rows in before.values())  # finished, not carried again
    measured(fault="process killed between version creation and alias", promise="the next run sets the alias; "
             "nothing registered twice", adapters=3, versions_before=sum(map(len, before.values())),
             half_registered=len(half), versions_after=sum(map(len, fleet.on("v2").values())),
             recovery_s=round(recovery, 1), lost=counted["lost"], duplicated=counted["duplicated"])


def test_a_record_retried_after_a_transient_error_makes_one_child_run(fleet, prefect_api, monkeypatch, measured):
    import flows.transfer_on_base_update as flow_module
    from tasks.revalidate import record
    from transpeft.tracking import Registry, TrackingUnavailable

    failed_once: set[str] = set()
    real = Registry.register_adapter

    def flaky(self, name, *args, **kwargs):
        if name not in failed_once:  # after the child run exists, before the version
            failed_once.add(name)
            raise TrackingUnavailable("MLflow answered 503")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(Registry, "register_adapter", flaky)
    monkeypatch.setattr(flow_module, "record", record.with_options(retry_delay_seconds=0))
    summary = transfer_on_base_update(fleet.family, "v2", fleet.data, fleet.params(GATE_PASS_ALL))

    counted = assert_recovered(fleet, "v2", summary)
    assert len(failed_once) == 3
    children = fleet.registry.runs("transfer", f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    assert sorted(r.data.tags["adapter"] for r in children) == fleet.adapters  # one each, none doubled
    assert {r.info.status for r in children} == {"FINISHED"}
    measured(fault="record task retried after a transient MLflow error", promise="one child run and one version "
             "per adapter", adapters=3, retries=len(failed_once), child_runs=len(children), lost=counted["lost"],
             duplicated=counted["duplicated"])


def _file_size_limit(limit: int):
    """For the child: files may grow to ``limit`` bytes; past it a write fails (EFBIG) instead of killing."""
    def apply():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


def test_disk_full_while_saving_leaves_the_old_adapter_and_no_half_written_one(world, tmp_path, measured):
    from transpeft.adapters import read_manifest

    out = tmp_path / "adapters" / "a"
    shutil.copytree(world / "adapters" / "a", out)
    before = read_manifest(out).weights_sha256
    full = subprocess.run([sys.executable, "-m", "transpeft.cli", "train", "--base", world / "bases" / "v1",
                           "--data", world / "data", "--tasks", "reverse", "--steps", "1", "--batch-size", "8",
                           "--out", out], capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(4096))
    assert full.returncode == 2, full.stderr[-3000:]
    assert f"adapter {out} could not be written (File too large)" in full.stderr
    assert "free disk space" in full.stderr and "Traceback" not in full.stderr
    lost = int(read_manifest(out).weights_sha256 != before)
    left = half_written(tmp_path)
    assert not lost and left == [] and sorted(p.name for p in out.parent.iterdir()) == ["a"]  # the old one intact
    measured(fault="disk full while saving an adapter (a 4 KiB file-size limit)", promise="a clear error, the "
             "previous adapter intact, no half-written folder", exit_code=full.returncode, half_written=len(left),
             lost=lost)
