"""What every fault test ends with: the promises the product makes whatever went wrong.

``assert_recovered`` checks, after the fault and the recovery:

    every adapter has exactly one version on the new base, with its alias when it is served;
    no half-written adapter folder (``*.partial``, ``*.old-*``) is left in the work folders;
    the counts on the revalidation's parent run match the registry.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from transpeft.revalidate import DECISIONS, REGISTRY_STATUS
from transpeft.tracking import Registry

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GATE_PASS_ALL = {"min_retention": 0.0, "min_score": 0.0, "beat_zero_shot": False, "strategies": ["direct"],
                 "retune_steps": 4}
GATE_RETUNE_ALL = {**GATE_PASS_ALL, "min_score": 1.01, "strategies": ["direct", "retune"]}


@dataclass
class Fleet:
    """One test's family on the servers: v1 with the adapters served on it, v2 registered, not revalidated."""

    family: str
    root: Path  # the world's folder: bases/, data/, adapters/
    registry: Registry
    adapters: list[str]

    @property
    def data(self) -> str:
        return str(self.root / "data")

    def params(self, gate: dict, **extra) -> str:
        """A params.yaml for this fleet's flows (the project's, with the servers, the gate and the CPU)."""
        params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
        params["gate"] = gate
        params["tracking"] = {"uri": self.registry.uri}
        params["placement"] = {"device": "cpu", "dtype": "bf16"}
        params["fanout"] = {"task_runner": "threads", "max_workers": 2}
        params.update(extra)
        path = self.root / f"params-{self.family}.yaml"
        path.write_text(yaml.safe_dump(params))
        return str(path)

    def on(self, version: str) -> dict[str, list]:
        """Each adapter's registry versions on ``version`` of this family."""
        fleet = self.registry.adapters()
        return {name: [r for r in fleet.get(name, []) if r.base_family == self.family and r.base_version == version]
                for name in self.adapters}


def half_written(*folders: Path) -> list[str]:
    """Staging or moved-aside adapter folders that a crash-proof save never leaves behind."""
    return sorted(str(p) for folder in folders if folder.exists() for p in folder.rglob("*")
                  if p.name.endswith(".partial") or ".old-" in p.name)


def assert_recovered(fleet: Fleet, version: str, summary: dict, served: set[str] | None = None,
                     failed: set[str] = frozenset()) -> dict:
    """The promises after any fault: one version per adapter on ``version`` (none for those that
    ``failed`` alone), aliased when ``served`` (default: all), nothing half-written, and the parent
    run's counts equal to what the registry holds. Returns the run's counts, with how many adapters
    were lost (no version) and how many versions were doubled, as measured before asserting."""
    on = fleet.on(version)
    lost = sum(not on[n] for n in fleet.adapters if n not in failed)
    duplicated = sum(max(len(rows) - 1, 0) for rows in on.values())
    assert {name: len(rows) for name, rows in on.items()} == {n: int(n not in failed) for n in fleet.adapters}, on
    for name, rows in on.items():
        for record in rows:
            assert record.serving == (served is None or name in served), record
            assert not record.half_registered, record
    workdirs = Path(tempfile.gettempdir()).glob(f"revalidate-{fleet.family}-*")  # a killed run's are left
    assert half_written(fleet.root, *workdirs) == []
    run = fleet.registry.run(summary["run_id"])
    counted = {k.removeprefix("adapters."): int(v) for k, v in run.data.metrics.items() if k.startswith("adapters.")}
    children = fleet.registry.runs("transfer", f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    decided = {r.data.tags["adapter"]: r.data.tags["decision"] for r in children}
    assert len(decided) == len(children)  # one child run per adapter
    assert {d: counted[d] for d in DECISIONS} == {d: list(decided.values()).count(d) for d in DECISIONS}
    for name, decision in decided.items():  # what the run says it did is what the registry holds
        assert [r.status for r in on[name]] == ([REGISTRY_STATUS[decision]] if decision != "failed" else []), name
    assert counted["already_done"] == sum(bool(rows) for rows in on.values()) - sum(
        d != "failed" for d in decided.values())
    assert counted["failed"] == len(failed)
    return {**counted, "lost": lost, "duplicated": duplicated}


def kill_tree(process: psutil.Process) -> int:
    """SIGKILL a process and every process under it, as a lost machine would; how many died."""
    family = [process, *process.children(recursive=True)]
    for member in family:
        member.kill()
    psutil.wait_procs(family, 10)
    return len(family)
