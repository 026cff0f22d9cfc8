"""Tasks of finetune-adapters: one adapter per (task, run) of params.yaml's grid."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from transpeft.bases import lend_base
from transpeft.data import load_task
from transpeft.params import load_params
from transpeft.tracking import AdapterRecord
from transpeft.train import train_adapter
from transpeft.transfer import unload_adapter
from transpeft.versioning import dvc_hash

from . import IO, shared_registry


@dataclass(frozen=True)
class Finetuned:
    """One adapter of the grid on its base: its registry version, and whether it was there already."""

    record: AdapterRecord
    skipped: bool

    def line(self) -> str:
        scores = ", ".join(f"{t} {v:.3f}" for t, v in self.record.metrics.items())
        return f"{self.record.name} on {self.record.base_version}: {scores}" + (
            " (already registered)" if self.skipped else "")

    def as_dict(self) -> dict:
        r = self.record
        return {"adapter": r.name, "base_version": r.base_version, "model_version": r.model_version,
                "metrics": dict(r.metrics), "skipped": self.skipped}


@task(**IO, task_run_name="finetune {task_name}-{run}")
def finetune_adapter(uri: str, task_name: str, run: str, data_dir: str, params_file: str) -> Finetuned:
    """Train adapter ``<task>-<run>`` on its run's base and register it there; skipped when it already is."""
    params = load_params(params_file)
    spec, name = params.train.runs[run], f"{task_name}-{run}"
    registry = shared_registry(uri)
    base = registry.base(params.bases.family, spec.base)
    existing = [r for r in registry.adapter_versions(name) if r.base_version == spec.base and r.status == "trained"]
    if existing:
        return Finetuned(existing[-1], skipped=True)
    task_data = load_task(Path(data_dir) / task_name)
    with tempfile.TemporaryDirectory() as tmp, lend_base(params.bases.ref(spec.base), base.fingerprint,
                                                         params.placement) as slot:
        out = Path(tmp) / name
        adapted, manifest, _ = train_adapter(slot.model, slot.tokenizer, slot.info, [task_data], params.train.method,
                                             params.train.config(run), out, progress=False)
        slot.model = unload_adapter(adapted, manifest.method.name)
        run_id = registry.log_training(name, out, manifest, extra_tags={
            "dvc_data_hash": dvc_hash(Path(data_dir) / task_name) or "untracked", "run": run})
        record = registry.register_adapter(name, out, slot.info, "trained", manifest.metrics, run_id,
                                           manifest=manifest)
    return Finetuned(record, skipped=False)
