"""MLflow as the pipeline's truth: which base versions exist, which adapter is valid on which base.

Registry layout (names are what a reviewer searches for in the MLflow UI):

    base-<family>              one model version per base version; tags base_version, fingerprint,
                               source, revision, parent, status; alias base-<base_version>
                               (MLflow reserves aliases like "v1")
    adapter-<name>             one model version per base version the adapter is valid on; tags
                               base_family, base_version, base_fingerprint, dataset_hash, method,
                               p_i, p_c, status, transferred_from, exact_match.<task>,
                               revalidation_run; alias on-<base_version> points at the version
                               to serve there. A version's run holds its files: the training or
                               re-tuning run, which later versions of unchanged files share

Runs go to experiments named after the step (train, evaluate, transfer): params, the loss curve,
metrics per task, the dataset hash, and the adapter files as plain artifacts (never through MLflow's
transformers flavour, which corrupts PEFT models on local bases).

Everything talks to one tracking server through an explicit ``MlflowClient``: an unreachable server
is an error, never a silent fallback to a local file store that would lose the runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from .adapters import Manifest, read_manifest
from .bases import BaseInfo
from .health import health_problem
from .progress import without_library_bars

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
BASE_PREFIX, ADAPTER_PREFIX = "base-", "adapter-"
DESCRIPTION_CHARS = 5000  # MLflow's limit on a registered model's or version's description
# failed-gate: flagged, kept unserved. scaled, distilled, retuned: made anew on that base by the strategy so
# named (transpeft/strategies.py); transferred: carried over unchanged.
ADAPTER_STATUSES = ("trained", "transferred", "scaled", "distilled", "retuned", "failed-gate")
MADE_ANEW = {"scaled": "scaled by the alpha picked on held-out rows", "distilled": "distilled from the old base",
             "retuned": "re-tuned"}
# A base's revalidation states that leave nothing for the reconciler; "incomplete" does.
FINISHED = ("done", "done with failures")


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached or answered with an error."""


class RegistryConflict(ValueError):
    """A registration that contradicts what the registry already holds."""


class NotRegistered(LookupError):
    """A base or adapter the registry does not know."""


def tracking_uri(uri: str | None = None) -> str:
    """The tracking server to use: the argument, else MLFLOW_TRACKING_URI, else the local default."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if not uri.startswith(("http://", "https://")):
        raise TrackingUnavailable(f"tracking URI {uri!r} is not a server: point MLFLOW_TRACKING_URI at an MLflow "
                                  "tracking server (http://...), e.g. the local one started with `make up`")
    return uri.rstrip("/")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    problem = health_problem(f"{uri}/health", timeout)
    if problem is not None:
        raise TrackingUnavailable(f"MLflow tracking server at {uri} {problem}; start the local one with `make up` "
                                  "or set MLFLOW_TRACKING_URI")


def _alias(text: str) -> str:
    """MLflow aliases allow letters, digits, '_' and '-'."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in text)


@dataclass(frozen=True)
class BaseRecord:
    family: str
    version: str
    fingerprint: str
    source: str
    parent: str | None
    model_version: str  # MLflow's version number within base-<family>
    revision: str | None = None
    revalidation: str | None = None  # done / done with failures / incomplete once transfer-on-base-update ran


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    base_family: str
    base_version: str
    status: str
    transferred_from: str | None
    metrics: dict[str, float]  # exact match per task on that base
    model_version: str
    serving: bool  # the on-<base_version> alias points here
    run_id: str = ""  # the run holding the adapter files
    to_serve: bool = False  # registered to be served there: its alias should point here
    weights_sha256: str = ""
    source: str = ""  # the files' URI in that run's artifacts (the version's source)
    gate: str = ""  # the gate's verdict on that base: "passed", or its reasons (none for a trained version)
    trained_on: str = ""  # the base version the adapter was trained (or re-tuned) on
    used: str = ""  # what the strategy that carried it used, e.g. "0 labels, 512 prompts" (none: unchanged)

    @property
    def files(self) -> str:
        return self.source or f"runs:/{self.run_id}/adapter"

    @property
    def half_registered(self) -> bool:
        """Registered to be served, but its alias was never set (a process killed in between)."""
        return self.to_serve and not self.serving


class Registry:
    """Bases, adapters and their runs on one MLflow tracking server."""

    def __init__(self, uri: str | None = None):
        self.uri = tracking_uri(uri)
        check_reachable(self.uri)
        without_library_bars()  # downloads draw no bar into a log
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        # What never changes once it exists, kept for the next call: experiment ids by name, and the
        # fingerprint of each ready base version (a version's weights are never replaced).
        self._experiments: dict[str, str] = {}
        self._fingerprints: dict[tuple[str, str], str] = {}
        # Each run started here -> its artifact URI: a model version names its files by that URI, not
        # runs:/, so reading them back takes no run lookups.
        self._artifact_roots: dict[str, str] = {}

    # -- runs -------------------------------------------------------------------------------------

    def _experiment(self, name: str) -> str:
        if name not in self._experiments:
            self._experiments[name] = self._find_or_create_experiment(name)
        return self._experiments[name]

    def _find_or_create_experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException as e:  # a concurrent task created it first
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(self, step: str, name: str, tags: dict | None = None, parent_run_id: str | None = None) -> str:
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        info = self.client.create_run(self._experiment(step), run_name=name, tags=tags).info
        self._artifact_roots[info.run_id] = info.artifact_uri
        return info.run_id

    def log(self, run_id: str, params: dict | None = None, metrics: dict | None = None, tags: dict | None = None,
            curve: tuple[str, list[float]] | None = None) -> None:
        now = int(time.time() * 1000)
        batch_metrics = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
        if curve:
            batch_metrics += [Metric(curve[0], float(v), now, step) for step, v in enumerate(curve[1])]
        batch_params = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        batch_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for start in range(0, max(len(batch_metrics), 1), 1000):  # MLflow takes 1000 metrics per batch
            self.client.log_batch(run_id, metrics=batch_metrics[start:start + 1000],
                                  params=batch_params if start == 0 else [], tags=batch_tags if start == 0 else [])

    def child_run(self, step: str, name: str, tags: dict, parent_run_id: str, key: str) -> tuple[str, bool]:
        """The child of ``parent_run_id`` whose tag ``key`` is ``tags[key]``, created on the first call; a
        retried task gets the run its first attempt made. Returns (run id, whether it existed)."""
        found = self.runs(step, f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.{key} = '{tags[key]}'")
        if found:
            return found[0].info.run_id, True
        return self.start_run(step, name, tags, parent_run_id), False

    def finish_run(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def log_files(self, run_id: str, directory: str | Path, under: str) -> None:
        """Every file of ``directory`` as the run's artifacts under ``under``/."""
        self.client.log_artifacts(run_id, str(directory), under)

    def runs(self, step: str, filter_string: str = "") -> list:
        """Every run of a step's experiment that matches ``filter_string``, across all pages."""
        return every_page(self.client.search_runs, experiment_ids=[self._experiment(step)],
                           filter_string=filter_string)

    def run(self, run_id: str):
        return self.client.get_run(run_id)

    # -- bases ------------------------------------------------------------------------------------

    def register_base(self, base: BaseInfo, parent: str | None = None) -> BaseRecord:
        """Register a base version; the same base again is a no-op, other contents under its name refused."""
        name = BASE_PREFIX + base.family
        existing = self._base_versions(base.family).get(base.version)
        if existing is not None:
            if existing.fingerprint != base.fingerprint:
                raise RegistryConflict(
                    f"base {base.family}/{base.version} is registered with fingerprint {existing.fingerprint}, "
                    f"this one has {base.fingerprint}: register the changed weights under a new version name")
            return existing
        for mv in self._registering(base.family, base.version):  # a registration a crash cut short
            if mv.tags.get("fingerprint") == base.fingerprint:
                return self._finish_registration(mv)
            self.client.delete_model_version(name, mv.version)
        if parent is not None and parent not in self._base_versions(base.family):
            raise NotRegistered(f"parent base {base.family}/{parent} is not registered; register it first")
        self._ensure_model(name, {"kind": "base", "family": base.family},
                           f"Base model family {base.family}: one version per base version.")
        run_id = self.start_run("register", f"register base {base.family}/{base.version}",
                                {"base_family": base.family, "base_version": base.version})
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "base.json").write_text(json.dumps({**base.as_dict(), "parent": parent}, indent=2))
            self.client.log_artifacts(run_id, tmp, "base")
        # status "registering": the webhook receiver skips it, this registration announces itself.
        tags = {"base_version": base.version, "fingerprint": base.fingerprint, "source": base.source,
                "revision": base.revision or "", "parent": parent or "", "status": "registering"}
        version = self._create_version(name, run_id, f"runs:/{run_id}/base", tags,
                                       f"{base.family}/{base.version} from {base.source}"
                                       + (f" (continued from {parent})" if parent else ""))
        return self._finish_registration(version)

    def _finish_registration(self, mv) -> BaseRecord:
        """A base version in status "registering" made ready: its alias, its status, its run finished."""
        name, version = mv.name, mv.tags["base_version"]
        self.client.set_registered_model_alias(name, _alias(f"base-{version}"), mv.version)
        self.client.set_model_version_tag(name, mv.version, "status", "ready")
        self.finish_run(mv.run_id)
        return self._base_versions(name.removeprefix(BASE_PREFIX))[version]

    def _registering(self, family: str, version: str | None = None, min_age_s: float = 0) -> list:
        """Versions of base-<family> still in status "registering" (of ``version``, at least that old)."""
        now_ms = time.time() * 1000
        return [mv for mv in self._versions(BASE_PREFIX + family) if mv.tags.get("status") == "registering"
                and version in (None, mv.tags.get("base_version"))
                and now_ms - mv.creation_timestamp >= min_age_s * 1000]

    def finish_stuck_registrations(self, family: str | None = None, min_age_s: float = 600) -> list[BaseRecord]:
        """Base registrations left in "registering" for ``min_age_s`` or more (their process died between
        creating the version and making it ready), finished: the reconciler then revalidates them."""
        families = self._families(family)
        return [self._finish_registration(mv) for f in families for mv in self._registering(f, min_age_s=min_age_s)]

    def created_in_mlflow(self, family: str | None = None) -> list[tuple[str, str]]:
        """(family, version) of each base version created straight in MLflow and not adopted yet: if the
        webhook's announcement was lost, nothing else would ever revalidate it."""
        families = self._families(family)
        return [(f, mv.tags.get("base_version", mv.version)) for f in families
                for mv in self._versions(BASE_PREFIX + f) if "status" not in mv.tags]

    def adopt_base(self, family: str, version: str) -> BaseRecord:
        """A base version created straight in MLflow (UI or API) with tags ``base_version`` and
        ``source`` (a directory, or a hub id with ``revision``): fingerprinted, made ready."""
        from .bases import BaseRef, describe_base

        found = [mv for mv in self._versions(BASE_PREFIX + family)
                 if mv.tags.get("base_version", mv.version) == version and mv.tags.get("status") != "ready"]
        if not found or not found[-1].tags.get("source"):
            raise NotRegistered(
                f"base {family}/{version} is not in the registry with a source to load it from; create the MLflow "
                f"version of base-{family} with tags base_version={version} and source=<directory or hub id> "
                f"(and revision=<commit> for a hub id), or use `transpeft bases register`")
        mv = found[-1]
        _, _, info = describe_base(BaseRef(mv.tags["source"], mv.tags.get("revision") or None, family, version))
        parent = mv.tags.get("parent") or None
        for key, value in (("base_version", version), ("fingerprint", info.fingerprint), ("source", info.source),
                           ("parent", parent or ""), ("status", "ready")):
            self.client.set_model_version_tag(BASE_PREFIX + family, mv.version, key, value)
        self.client.set_registered_model_alias(BASE_PREFIX + family, _alias(f"base-{version}"), mv.version)
        return self._base_versions(family)[version]

    def _base_versions(self, family: str) -> dict[str, BaseRecord]:
        records = {}
        for mv in self._versions(BASE_PREFIX + family):
            if mv.tags.get("status") != "ready":
                continue
            records[mv.tags["base_version"]] = BaseRecord(
                family=family, version=mv.tags["base_version"], fingerprint=mv.tags["fingerprint"],
                source=mv.tags.get("source", ""), parent=mv.tags.get("parent") or None, model_version=mv.version,
                revision=mv.tags.get("revision") or None, revalidation=mv.tags.get("revalidation") or None)
        return records

    def bases(self, family: str | None = None) -> list[BaseRecord]:
        """Registered base versions, each family's in registration order (oldest first)."""
        families = self._families(family)
        return [r for f in families
                for r in sorted(self._base_versions(f).values(), key=lambda r: int(r.model_version))]

    def mark_revalidation(self, family: str, version: str, state: str, run_id: str) -> None:
        """Record on the base version that its revalidation ran (state done) or left work (incomplete)."""
        record = self.base(family, version)
        for key, value in (("revalidation", state), ("revalidation_run", run_id)):
            self.client.set_model_version_tag(BASE_PREFIX + family, record.model_version, key, value)

    def base(self, family: str, version: str) -> BaseRecord:
        record = self._base_versions(family).get(version)
        if record is None:
            raise NotRegistered(f"base {family}/{version} is not in the registry; register it with "
                                f"`transpeft bases register --base <dir> --base-family {family} "
                                f"--base-version {version}`")
        return record

    # -- adapters ---------------------------------------------------------------------------------

    def log_training(self, name: str, adapter_dir: Path, manifest: Manifest, extra_tags: dict | None = None) -> str:
        """A finished training run: params, loss curve, metrics, dataset hashes, the adapter files."""
        run_id = self.start_run("train", f"train {name} on {manifest.base.family}/{manifest.base.version}", {
            "adapter": name, "base_family": manifest.base.family, "base_version": manifest.base.version,
            "dataset_hash": manifest.dataset_hash, "method": manifest.method.name,
            **(extra_tags or {}),
        })
        training = {k: v for k, v in manifest.training.items() if k != "loss_curve"}
        self.log(run_id, params={**{f"method.{k}": v for k, v in manifest.method.__dict__.items()}, **training,
                                 "tasks": ",".join(manifest.tasks), "dataset_hash": manifest.dataset_hash},
                 metrics=_flat_metrics(manifest.metrics), curve=("loss", manifest.training.get("loss_curve", [])))
        self.log_files(run_id, adapter_dir, "adapter")
        self.finish_run(run_id)
        return run_id

    def log_evaluation(self, name: str, base: BaseInfo, metrics: dict[str, dict]) -> str:
        run_id = self.start_run("evaluate", f"evaluate {name} on {base.family}/{base.version}",
                                {"adapter": name, "base_family": base.family, "base_version": base.version})
        self.log(run_id, metrics=_flat_metrics(metrics))
        self.finish_run(run_id)
        return run_id

    def register_adapter(self, name: str, adapter_dir: Path, base: BaseInfo, status: str, metrics: dict,
                         run_id: str, transferred_from: str | None = None, serve: bool = True,
                         tags: dict | None = None, manifest: Manifest | None = None,
                         files: str | None = None) -> AdapterRecord:
        """Record that the adapter in ``adapter_dir`` is valid on ``base``. Its files are run ``run_id``'s
        adapter/ artifacts, or at ``files`` in that run (an earlier version's ``source``, when they are
        that version's files unchanged). ``manifest``: the folder's, when the caller has read it already."""
        if status not in ADAPTER_STATUSES:
            raise ValueError(f"adapter status must be one of {ADAPTER_STATUSES}, got {status!r}")
        key = (base.family, base.version)
        if key not in self._fingerprints:
            self._fingerprints[key] = self.base(base.family, base.version).fingerprint
        if self._fingerprints[key] != base.fingerprint:
            raise RegistryConflict(f"base {base.family}/{base.version} differs from the registered one "
                                   f"(fingerprint {base.fingerprint} vs {self._fingerprints[key]})")
        manifest = manifest or read_manifest(adapter_dir)
        model = ADAPTER_PREFIX + name
        versions = self.adapter_versions(name)
        for record in versions:
            if (record.base_version, record.weights_sha256, record.status) == (base.version, manifest.weights_sha256,
                                                                               status):
                # Registering the same thing twice changes nothing, but finishes what a killed first try left.
                if serve and not record.serving:
                    record = self.serve(record)
                    self._describe(name, versions, record)
                return record
        if not versions:  # a new adapter (or one whose only version was deleted)
            self._ensure_model(model, {"kind": "adapter"},
                               f"Adapter {name}: one version per base version it is valid on.")
        # The UI lists tags in this order: what a reviewer compares across versions comes first.
        tags = {"base_version": base.version, "status": status,
                **{f"exact_match.{t}": round(m["exact_match"], 4) for t, m in metrics.items()},
                "transferred_from": transferred_from or "", "trained_on": manifest.base.version,
                "base_family": base.family, "base_fingerprint": base.fingerprint,
                "dataset_hash": manifest.dataset_hash, "method": manifest.method.name, "p_i": manifest.p_i,
                "p_c": manifest.p_c, "seed": manifest.seed, "weights_sha256": manifest.weights_sha256,
                # The version is created before its alias; this says the alias is owed, so a version left
                # without it (a kill in between) is finished by the next registration or plan.
                "serve": str(serve).lower(), **(tags or {})}
        if files is None:
            root = self._artifact_roots.get(run_id)
            files = f"{root}/adapter" if root else f"runs:/{run_id}/adapter"
        line = verdict(AdapterRecord(name, base.family, base.version, status, transferred_from,
                                     {t: m["exact_match"] for t, m in metrics.items()}, "", False,
                                     gate=tags.get("gate", ""), used=tags.get("used", "")))
        version = self._create_version(model, run_id, files, tags, line)
        record = _adapter_record(name, version, {})  # a new version: no alias points at it yet
        record = self.serve(record) if serve else record
        self._describe(name, versions, record)
        return record

    def _describe(self, name: str, versions: list[AdapterRecord], changed: AdapterRecord) -> None:
        """The adapter's page in the UI: every base version side by side, rewritten at every registration.
        ``versions``: as read before ``changed`` was made or served (its alias moves off the others)."""
        rows = [r for r in versions if r.model_version != changed.model_version]
        if changed.serving:
            rows = [replace(r, serving=False) if r.base_version == changed.base_version else r for r in rows]
        self.client.update_registered_model(ADAPTER_PREFIX + name, description=adapter_description(name,
                                                                                                   [*rows, changed]))

    def serve(self, record: AdapterRecord) -> AdapterRecord:
        """Point the adapter's on-<base_version> alias at this version."""
        self.client.set_registered_model_alias(ADAPTER_PREFIX + record.name, _alias(f"on-{record.base_version}"),
                                               record.model_version)
        return replace(record, serving=True)

    def adapter_versions(self, name: str) -> list[AdapterRecord]:
        model = ADAPTER_PREFIX + name
        try:
            aliases = self.client.get_registered_model(model).aliases
        except MlflowException:
            return []
        return sorted((_adapter_record(name, mv, aliases) for mv in self._versions(model)),
                      key=lambda r: int(r.model_version))

    def download_adapter(self, record: AdapterRecord, into: Path) -> Path:
        """The adapter files of a registered version, downloaded to ``into``/<their folder's name>."""
        Path(into).mkdir(parents=True, exist_ok=True)
        return Path(download_artifacts(artifact_uri=record.files, dst_path=str(into), tracking_uri=self.uri))

    def adapter_tags(self, record: AdapterRecord) -> dict[str, str]:
        """The registry version's tags: the gate's verdict, fingerprints, hashes."""
        return self.client.get_model_version(ADAPTER_PREFIX + record.name, record.model_version).tags

    def adapters(self) -> dict[str, list[AdapterRecord]]:
        """Every adapter with its versions, however many: two paged searches, not one call per adapter."""
        aliases = {m.name: m.aliases for m in self._models(ADAPTER_PREFIX)}
        records: dict[str, list[AdapterRecord]] = {m.removeprefix(ADAPTER_PREFIX): [] for m in aliases}
        for mv in every_page(self.client.search_model_versions, filter_string=f"name LIKE '{ADAPTER_PREFIX}%'"):
            if mv.name in aliases:  # a model created between the two searches waits for the next call
                name = mv.name.removeprefix(ADAPTER_PREFIX)
                records[name].append(_adapter_record(name, mv, aliases[mv.name]))
        return {name: sorted(rows, key=lambda r: int(r.model_version)) for name, rows in sorted(records.items())}

    # -- registry plumbing ------------------------------------------------------------------------

    def _models(self, prefix: str):
        return every_page(self.client.search_registered_models, filter_string=f"name LIKE '{prefix}%'")

    def _families(self, family: str | None) -> list[str]:
        """``family``, or every base family in the registry."""
        return [family] if family else [m.name.removeprefix(BASE_PREFIX) for m in self._models(BASE_PREFIX)]

    def _versions(self, model: str):
        return every_page(self.client.search_model_versions, filter_string=f"name = '{model}'")

    def _ensure_model(self, name: str, tags: dict, description: str) -> None:
        try:
            self.client.create_registered_model(name, tags=tags, description=description)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _create_version(self, model: str, run_id: str, source: str, tags: dict, description: str):
        return self.client.create_model_version(model, source=source, run_id=run_id,
                                                tags={k: str(v) for k, v in tags.items()}, description=description)


def every_page(search, **query) -> list:
    """All results of a paged MLflow search: its pages end at 100 registered models by default."""
    found, token = [], None
    while True:
        page = search(page_token=token, **query)
        found += list(page)
        token = page.token
        if not token:
            return found


def verdict(record: AdapterRecord) -> str:
    """A version's one-line verdict: what it is on its base, and why (its description in the UI)."""
    base = f"{record.base_family}/{record.base_version}"
    scores = ", ".join(f"{task} {value:.3f}" for task, value in sorted(record.metrics.items()))
    if record.status == "trained":
        how = f"trained on {base}"
    elif record.status == "transferred":
        how = f"carried over from {record.transferred_from} to {base} unchanged; the gate passed it"
    elif record.status in MADE_ANEW:
        how = (f"carried over from {record.transferred_from} to {base}, failed the gate, {MADE_ANEW[record.status]}"
               + (f" (used {record.used})" if record.used else "") + ": it passes")
    else:
        reason = record.gate or "failed the gate"
        how = f"carried over from {record.transferred_from} to {base}, kept unserved: {reason}"
    return f"{how}. Exact match: {scores or 'none recorded'}"[:DESCRIPTION_CHARS]


def adapter_description(name: str, records: list[AdapterRecord]) -> str:
    """The registered adapter's description, Markdown: one row per version, scores per task side by side."""
    tasks = sorted({task for record in records for task in record.metrics})
    rows = [f"Adapter **{name}** on each base version it was carried to, oldest first. Served: the version "
            "that base's `on-<base version>` alias points at.", "",
            "| base | version | status | served | " + " | ".join(f"{t} (exact match)" for t in tasks) +
            " | came from | gate |",
            "|" + "---|" * (6 + len(tasks))]
    for r in sorted(records, key=lambda r: int(r.model_version)):
        came_from = f"trained on {r.trained_on}" if r.status == "trained" else f"carried over from {r.transferred_from}"
        if r.status in MADE_ANEW:
            came_from += f", {MADE_ANEW[r.status]} on {r.base_version}" + (f" (used {r.used})" if r.used else "")
        scores = [f"{r.metrics[t]:.3f}" if t in r.metrics else "" for t in tasks]
        gate = "" if r.status == "trained" else _cell(r.gate)
        rows.append(f"| {r.base_family}/{r.base_version} | {r.model_version} | {r.status} | "
                    f"{'yes' if r.serving else 'no'} | " + " | ".join(scores) + f" | {came_from} | {gate} |")
    text = "\n".join(rows)
    return text if len(text) <= DESCRIPTION_CHARS else text[:DESCRIPTION_CHARS - 40] + "\n\n(table cut short)"


def _cell(text: str, limit: int = 240) -> str:
    """``text`` fit for one Markdown table cell."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _adapter_record(name: str, mv, aliases: dict[str, str]) -> AdapterRecord:
    tags = mv.tags
    return AdapterRecord(
        name=name, base_family=tags["base_family"], base_version=tags["base_version"], status=tags["status"],
        transferred_from=tags.get("transferred_from") or None, model_version=mv.version, run_id=mv.run_id,
        metrics={k.removeprefix("exact_match."): float(v) for k, v in tags.items() if k.startswith("exact_match.")},
        serving=aliases.get(_alias(f"on-{tags['base_version']}")) == mv.version,
        to_serve=tags.get("serve") == "true", weights_sha256=tags.get("weights_sha256", ""), source=mv.source or "",
        gate=tags.get("gate", ""), trained_on=tags.get("trained_on", ""), used=tags.get("used", ""))


def _flat_metrics(metrics: dict[str, dict]) -> dict[str, float]:
    return {f"{name}.{task}": value for task, values in metrics.items() for name, value in values.items()
            if name != "n"}


def adapter_name(directory: Path) -> str:
    """An adapter's registry name: its folder name."""
    return Path(directory).resolve().name


def log_study(uri: str | None, summary: dict, out: Path) -> str:
    """One MLflow run in experiment ``study``: the settings, the main table as metrics, every output file."""
    registry = Registry(uri)
    chosen = summary["chosen"]
    run = registry.start_run("study", f"study {', '.join(summary['updates'])}", {"seeds": summary["seeds"]})
    metrics = {}
    for update, tasks in summary["table"].items():
        for task, row in tasks.items():
            for arm, cell in row.items():
                if cell["mean"] is not None:
                    metrics[f"{arm}.{task}.{update.replace('->', '_to_')}"] = cell["mean"]
    registry.log(run, params={**{f"adapter.{k}": v for k, v in summary["adapter"].items()},
                              "chosen.targets": chosen["targets"], "chosen.p_c": chosen["p_c"],
                              "chosen.p_i": chosen["p_i"], "retune_knee": summary["retune_knee"]},
                 metrics=metrics)
    registry.log_files(run, out, "study")
    registry.finish_run(run)
    return run
