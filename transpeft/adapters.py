"""Adapter folders: the method's own files plus a manifest, written atomically, checked on read.

    my-adapter/
      adapter_config.json          the method's config (peft's, or the bottleneck's)
      adapter_model.safetensors    the adapter weights, nothing else
      transpeft.json               the manifest: base, task, data hash, method, p_i, p_c, seed, ...

A folder is written under a temporary name and renamed into place only when complete, so a crash
leaves either the previous adapter or none, never a half-written one that looks trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from torch import nn

from .bases import BaseInfo
from .bottleneck import BottleneckSublayer
from .methods import MethodConfig, get_method
from .regularisers import linear_shape

MANIFEST_NAME = "transpeft.json"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """An adapter folder that is missing, incomplete or corrupt."""


class AdapterNotSaved(OSError):
    """An adapter that could not be written (disk full, a file-size limit, no permission); nothing was replaced."""


@dataclass(frozen=True)
class Manifest:
    method: MethodConfig
    base: BaseInfo
    tasks: tuple[str, ...]
    dataset_hash: str
    p_i: float
    p_c: float
    seed: int
    targets: dict[str, list[int]]  # adapted base module -> [in_features, out_features]
    training: dict
    metrics: dict  # task -> metrics on the base it was trained on
    library_versions: dict
    weights_sha256: str = ""
    created_at: str = ""
    # Over every other field, so a hand-edited manifest (another base's fingerprint, other metrics) is
    # refused. It shows an edit or damage, not a forger, who can recompute it; the registry keeps the
    # fingerprint and the weights' checksum each adapter version was registered with.
    manifest_sha256: str = ""

    def sealed(self) -> Manifest:
        """This manifest with ``manifest_sha256`` computed over its other fields."""
        return replace(self, manifest_sha256=self._digest())

    def _digest(self) -> str:
        return hashlib.sha256(replace(self, manifest_sha256="").to_json().encode()).hexdigest()

    def to_json(self) -> str:
        raw = {
            "format": FORMAT_VERSION, **self.__dict__,
            "method": self.method.__dict__, "base": self.base.as_dict(), "tasks": list(self.tasks),
        }
        return json.dumps(raw, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if raw.pop("format", None) != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest format (this version reads format {FORMAT_VERSION})")
        method = raw.pop("method")
        if method.get("target_modules") is not None:
            method["target_modules"] = tuple(method["target_modules"])
        return cls(**{**raw, "method": MethodConfig(**method), "base": BaseInfo.from_dict(raw["base"]),
                      "tasks": tuple(raw["tasks"])})


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("transpeft", "torch", "transformers", "peft", "accelerate"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # running from a source tree
            versions[name] = "unknown"
    return versions


def adapted_targets(model: nn.Module) -> dict[str, list[int]]:
    """Base module path -> (in, out) of every module the adapter wraps, as the base names it."""
    targets = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer | BottleneckSublayer):
            name = name.removeprefix("base_model.model.")
            shape = linear_shape(module)
            if shape is None:  # a whole sub-layer (bottleneck): it maps hidden -> hidden
                hidden = model.get_input_embeddings().embedding_dim
                shape = (hidden, hidden)
            targets[name] = list(shape)
    return targets


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """Make a directory's entries (a file created or renamed in it) survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_adapter(model: nn.Module, directory: str | Path, manifest: Manifest) -> Path:
    """Write the adapter and its manifest to ``directory`` atomically (replacing any old one)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent))
    previous = None
    try:
        get_method(manifest.method.name).save(model, staging)
        stamped = replace(manifest, weights_sha256=_sha256(staging / WEIGHTS_NAME),
                          created_at=datetime.now(timezone.utc).isoformat(timespec="seconds")).sealed()
        (staging / MANIFEST_NAME).write_text(stamped.to_json(), encoding="utf-8")
        _fsync_tree(staging)
        if directory.exists():
            previous = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
            directory.rename(previous)
        staging.rename(directory)
        _fsync_dir(directory.parent)
        if previous is not None:
            shutil.rmtree(previous)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if previous is not None and not directory.exists():
            previous.rename(directory)  # moved aside, but the new one never landed: the old one comes back
        if isinstance(e, OSError):
            raise AdapterNotSaved(f"adapter {directory} could not be written ({e.strerror or e}); nothing was "
                                  "replaced: free disk space (or raise the file-size limit) and run it again") from e
        raise
    return directory


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of a complete, uncorrupted adapter folder, or AdapterFileError saying what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"adapter {directory}: no such folder")
    for name in (MANIFEST_NAME, CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise AdapterFileError(f"adapter {directory}: {name} is missing; the folder is incomplete, "
                                   "train or copy the adapter again")
    try:
        manifest = Manifest.from_json((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (ValueError, TypeError, KeyError) as e:
        raise AdapterFileError(f"adapter {directory}: {MANIFEST_NAME} is unreadable ({e})") from None
    if manifest.manifest_sha256 and manifest._digest() != manifest.manifest_sha256:  # empty: saved before it existed
        raise AdapterFileError(f"adapter {directory}: {MANIFEST_NAME} was edited after the adapter was saved (its "
                               "fields no longer match its manifest_sha256); restore it, or train or copy the "
                               "adapter again")
    try:
        with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
            if not list(f.keys()):
                raise AdapterFileError(f"adapter {directory}: {WEIGHTS_NAME} holds no tensors")
    except SafetensorError as e:
        raise AdapterFileError(f"adapter {directory}: {WEIGHTS_NAME} is corrupt ({e})") from None
    if manifest.weights_sha256 and _sha256(directory / WEIGHTS_NAME) != manifest.weights_sha256:
        raise AdapterFileError(f"adapter {directory}: {WEIGHTS_NAME} does not match the checksum in "
                               f"{MANIFEST_NAME}; the file was changed or damaged, copy it again")
    return manifest
