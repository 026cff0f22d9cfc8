"""Base models: where they come from, how they load, and what identifies them.

A base is a local model directory or a hub id pinned to a revision. Its fingerprint hashes its
config, tokenizer and weights, so two bases with the same name but different contents never pass
for each other. Its signature holds what an adapter depends on: architecture, sizes, vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

# Config fields that say where or how a model was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}


class BaseLoadError(RuntimeError):
    """A base that cannot be found or loaded."""


@dataclass(frozen=True)
class BaseRef:
    """What the user typed: a directory, or a hub id with a pinned revision."""

    source: str
    revision: str | None = None
    family: str | None = None
    version: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.source).is_dir()

    def resolved_family(self) -> str:
        if self.family:
            return self.family
        return Path(self.source).resolve().parent.name if self.is_local else self.source

    def resolved_version(self) -> str:
        if self.version:
            return self.version
        return Path(self.source).resolve().name if self.is_local else (self.revision or "main")


@dataclass(frozen=True)
class BaseSignature:
    """What an adapter needs to be the same on the base it is loaded onto."""

    model_type: str
    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    tokenizer_hash: str


@dataclass(frozen=True)
class BaseInfo:
    family: str
    version: str
    source: str
    revision: str | None
    fingerprint: str
    signature: BaseSignature

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> BaseInfo:
        return cls(**{**raw, "signature": BaseSignature(**raw["signature"])})


def tokenizer_hash(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: what token ids mean."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {k: v for k, v in tokenizer.special_tokens_map.items()}
    blob = json.dumps({"vocab": vocab, "specials": specials}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def config_hash(config) -> str:
    raw = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + b"\0" + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model: torch.nn.Module, tokenizer) -> str:
    """sha256 over the config, tokenizer and weights hashes, prefixed for readability."""
    parts = (config_hash(model.config), tokenizer_hash(tokenizer), weights_hash(model))
    return "sha256:" + hashlib.sha256("|".join(parts).encode()).hexdigest()


def signature(model: torch.nn.Module, tokenizer) -> BaseSignature:
    config = model.config.get_text_config()
    return BaseSignature(
        model_type=config.model_type,
        architecture=type(model).__name__,
        hidden_size=model.get_input_embeddings().embedding_dim,
        num_layers=config.num_hidden_layers,
        vocab_size=model.get_input_embeddings().num_embeddings,
        tokenizer_hash=tokenizer_hash(tokenizer),
    )


def load_base(ref: BaseRef, dtype: torch.dtype = torch.float32, device: str | None = None):
    """(model, tokenizer, BaseInfo) for a base; weights only from safetensors."""
    if not ref.is_local and ref.revision is None:
        raise BaseLoadError(f"base {ref.source!r}: no such directory; for a hub model give its id "
                            "and pin a revision (commit hash or tag)")
    hf_logging.disable_progress_bar()  # a per-tensor bar for a small model is noise; ours show the long steps
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.source, revision=ref.revision)
        model = AutoModelForCausalLM.from_pretrained(ref.source, revision=ref.revision, dtype=dtype,
                                                     use_safetensors=True)
    except (OSError, ValueError) as e:
        raise BaseLoadError(f"could not load base {ref.source!r}"
                            f"{f' at revision {ref.revision}' if ref.revision else ''}: {e}") from e
    if device:
        model.to(device)
    model.eval()
    info = BaseInfo(  # a local source is recorded absolute: workers elsewhere in the tree load it too
        family=ref.resolved_family(), version=ref.resolved_version(),
        source=str(Path(ref.source).resolve()) if ref.is_local else ref.source,
        revision=ref.revision, fingerprint=fingerprint(model, tokenizer), signature=signature(model, tokenizer),
    )
    return model, tokenizer, info


class BaseLender:
    """Base instances shared by concurrent users in one process: loaded once per concurrent slot.

    A PEFT adapter is injected into the model it is loaded onto, so two adapters cannot share one
    instance at the same time. The lender hands each borrower an idle instance of the base, loads
    another only when all are lent out, and takes back only instances returned clean (the
    borrower sets ``slot.model`` to the unloaded base; an exception, or ``slot.broken``, drops it).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._idle: dict[BaseRef, list] = {}
        self._loading: dict[BaseRef, threading.Lock] = {}

    @contextmanager
    def borrow(self, ref: BaseRef, fingerprint: str | None = None):
        """An instance of the base; with ``fingerprint``, only if the weights are still the registered ones."""
        with self._lock:
            idle = self._idle.setdefault(ref, [])
            slot = idle.pop() if idle else None
            loading = self._loading.setdefault(ref, threading.Lock())
        if slot is None:
            with loading:  # one load at a time per base: a second slot waits instead of doubling the I/O
                model, tokenizer, info = load_base(ref)
            slot = SimpleNamespace(model=model, tokenizer=tokenizer, info=info)
        if fingerprint is not None and slot.info.fingerprint != fingerprint:
            raise BaseLoadError(f"base {ref.family}/{ref.version} at {ref.source} is not the registered one "
                                f"(fingerprint {slot.info.fingerprint}, registered {fingerprint}); register the "
                                "changed weights as a new version")  # the instance is dropped, not lent again
        yield slot
        if not getattr(slot, "broken", False):
            with self._lock:
                self._idle[ref].append(slot)


_LENDER = BaseLender()  # one per process: Prefect threads share it, each Dask worker process has its own


def lend_base(ref: BaseRef, fingerprint: str | None = None):
    """This process's lender's ``borrow``: ``with lend_base(ref) as slot: slot.model ...``."""
    return _LENDER.borrow(ref, fingerprint)
