"""Base models: where they come from, how they load, and what identifies them.

A base is a local model directory or a hub id pinned to a revision. Its fingerprint hashes its
config, tokenizer and weights files, so two bases with the same name but different contents never
pass for each other, while one base loaded in bf16 on a GPU keeps the fingerprint it was registered
with from a CPU in fp32. Its signature holds what an adapter depends on: architecture, sizes, vocabulary.
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
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .placement import Placement
from .progress import without_library_bars

# Config fields that say where or how a model was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}


FAMILY_RECORD = "family.json"  # beside a family's version folders: {"family": "<name>", ...}


# transformers builds a model under torch's process-wide default dtype, set to the model's dtype and
# restored after. Two threads loading at once can leave it bf16 for good, and an adapter layer made
# meanwhile takes the wrong dtype ("expected m1 and m2 to have the same dtype" on scoring). So bases
# load, their skeletons are built (from_config sets it as well), and adapters are made, one at a time
# per process.
BUILDING = threading.RLock()


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
        """The family given; else, for a folder, the one its family's record names (``family.json``
        beside the version folders, as ``bases build-demo`` writes it), else the parent folder's name."""
        if self.family:
            return self.family
        if not self.is_local:
            return self.source
        return recorded_family(self.source) or Path(self.source).resolve().parent.name

    def resolved_version(self) -> str:
        if self.version:
            return self.version
        return Path(self.source).resolve().name if self.is_local else (self.revision or "main")


def recorded_family(source: str | Path) -> str | None:
    """The family named by ``family.json`` in the folder above a base version's folder, if any."""
    record = Path(source).resolve().parent / FAMILY_RECORD
    try:
        name = json.loads(record.read_text(encoding="utf-8")).get("family")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


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
    """Hash of an in-memory model's tensors, for a model that has no files (tests, fresh builds)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + b"\0" + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_hash(files: list[Path]) -> str:
    """Hash of a base's safetensors files as stored: the same whatever dtype or device it is loaded in."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


def _fingerprint(config, tokenizer, weights: str) -> str:
    return "sha256:" + hashlib.sha256("|".join((config_hash(config), tokenizer_hash(tokenizer), weights)).encode()).hexdigest()


def fingerprint(model: torch.nn.Module, tokenizer) -> str:
    """sha256 over the config, tokenizer and weights hashes of an in-memory model."""
    return _fingerprint(model.config, tokenizer, weights_hash(model))


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


def _weight_files(ref: BaseRef) -> list[Path]:
    if ref.is_local:
        root = Path(ref.source)
    else:  # fetched once into the hub cache (from_pretrained reads the same files)
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(ref.source, revision=ref.revision, allow_patterns=["*.safetensors"]))
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise BaseLoadError(f"base {ref.source!r}: no *.safetensors weights in {root}; weights load only from "
                            "safetensors: convert them with save_pretrained(dir, safe_serialization=True)")
    return files


def _check_weights(ref: BaseRef, skeleton: torch.nn.Module, files: list[Path]) -> None:
    """The weight files are whole and fit the config: their headers read, and every tensor they share
    with the model the config describes has its shape. Reads headers only, not the weights."""
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    wrong = []
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except SafetensorError as e:
            raise BaseLoadError(f"base {ref.source!r}: {path.name} is truncated or corrupt ({e}); copy or download "
                                "the base again") from None
        wrong += [f"{key}: weights {shape}, config.json expects {expected[key]}" for key, shape in stored.items()
                  if key in expected and expected[key] != shape]
    if wrong:
        raise BaseLoadError(f"base {ref.source!r}: config.json does not describe its weights ({len(wrong)} tensors "
                            f"differ, e.g. {'; '.join(wrong[:3])}); restore the config that was saved with them")


def describe_base(ref: BaseRef):
    """(config, tokenizer, BaseInfo) for a base, without loading its weights: registering a 7B base
    hashes its files and builds its skeleton on the meta device, in seconds and no memory."""
    if not ref.is_local and ref.revision is None:
        raise BaseLoadError(f"base {ref.source!r}: no such directory; for a hub model give its id "
                            "and pin a revision (commit hash or tag)")
    if ref.is_local and not (Path(ref.source) / "config.json").is_file():  # else transformers guesses a tokenizer
        raise BaseLoadError(f"base {ref.source!r} is not a model directory: it has no config.json. Give the folder "
                            "that save_pretrained wrote (config.json, tokenizer files, *.safetensors)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.source, revision=ref.revision)
        config = AutoConfig.from_pretrained(ref.source, revision=ref.revision)
        files = _weight_files(ref)
        with BUILDING, torch.device("meta"):  # from_config sets the default dtype too, to the config's
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as e:
        raise BaseLoadError(f"could not load base {ref.source!r}"
                            f"{f' at revision {ref.revision}' if ref.revision else ''}: {e}") from e
    _check_weights(ref, skeleton, files)
    info = BaseInfo(  # a local source is recorded absolute: workers elsewhere in the tree load it too
        family=ref.resolved_family(), version=ref.resolved_version(),
        source=str(Path(ref.source).resolve()) if ref.is_local else ref.source,
        revision=ref.revision, fingerprint=_fingerprint(config, tokenizer, files_hash(files)),
        signature=signature(skeleton, tokenizer),
    )
    return config, tokenizer, info


def load_base(ref: BaseRef, placement: Placement = Placement()):
    """(model, tokenizer, BaseInfo) for a base, its weights (only from safetensors) on the placement's
    device in its dtype, ready for evaluation."""
    without_library_bars()
    config, tokenizer, info = describe_base(ref)
    device, dtype = placement.resolve(config)
    try:
        with BUILDING:
            model = AutoModelForCausalLM.from_pretrained(  # an absolute path: adapters record it as their base
                info.source, revision=ref.revision, dtype=dtype, use_safetensors=True,
                device_map=None if device.type == "cpu" else device)  # straight onto the GPU, no CPU copy
    except (OSError, ValueError) as e:
        raise BaseLoadError(f"could not load base {ref.source!r}"
                            f"{f' at revision {ref.revision}' if ref.revision else ''}: {e}") from e
    return model.eval(), tokenizer, info


class BaseLender:
    """Base instances shared by concurrent users in one process: loaded once per concurrent slot.

    A PEFT adapter is injected into the model it is loaded onto, so two adapters cannot share one
    instance at the same time. The lender hands each borrower an idle instance of the base, loads
    another only when all are lent out, and takes back only instances returned clean (the
    borrower sets ``slot.model`` to the unloaded base; an exception, or ``slot.broken``, drops it).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._idle: dict[tuple[BaseRef, Placement], list] = {}
        self._loading: dict[tuple[BaseRef, Placement], threading.Lock] = {}
        self._slots: threading.BoundedSemaphore | None = None  # at most this many lent at once, any base

    def limit(self, slots: int | None) -> None:
        """Lend at most ``slots`` instances at a time (None: no limit): a borrower beyond waits. With more
        threads than slots, the others fetch and record adapters while these compute."""
        self._slots = threading.BoundedSemaphore(slots) if slots else None

    @contextmanager
    def borrow(self, ref: BaseRef, fingerprint: str | None = None, placement: Placement = Placement(),
               beside: bool = False):
        """An instance of the base on ``placement``; with ``fingerprint``, only if the weights are
        still the registered ones. ``beside``: for a borrower that holds a slot already (distillation's
        old base, beside the new one), so it takes none of the limit's: it would wait on itself."""
        slots = None if beside else self._slots
        if slots is not None:
            slots.acquire()
        try:
            with self._lent(ref, fingerprint, placement) as slot:
                yield slot
        finally:
            if slots is not None:
                slots.release()

    @contextmanager
    def _lent(self, ref: BaseRef, fingerprint: str | None, placement: Placement):
        key = (ref, placement)
        with self._lock:
            idle = self._idle.setdefault(key, [])
            slot = idle.pop() if idle else None
            loading = self._loading.setdefault(key, threading.Lock())
        if slot is None:
            with loading:  # one load at a time per base: a second slot waits instead of doubling the I/O
                model, tokenizer, info = load_base(ref, placement)
            slot = SimpleNamespace(model=model, tokenizer=tokenizer, info=info)
        if fingerprint is not None and slot.info.fingerprint != fingerprint:
            raise BaseLoadError(f"base {ref.family}/{ref.version} at {ref.source} is not the registered one "
                                f"(fingerprint {slot.info.fingerprint}, registered {fingerprint}); register the "
                                "changed weights as a new version")  # the instance is dropped, not lent again
        yield slot
        if not getattr(slot, "broken", False):
            with self._lock:
                self._idle[key].append(slot)


_LENDER = BaseLender()  # one per process: Prefect threads share it, each Dask worker process has its own


def lend_base(ref: BaseRef, fingerprint: str | None = None, placement: Placement = Placement(), beside: bool = False):
    """This process's lender's ``borrow``: ``with lend_base(ref) as slot: slot.model ...``."""
    return _LENDER.borrow(ref, fingerprint, placement, beside)


def lend_beside(base, placement: Placement = Placement()):
    """A second base for a borrower already holding a slot: distillation's teacher, from a registry
    ``BaseRecord`` or an adapter's ``BaseInfo``; loaded once per slot and lent again like any other."""
    return lend_base(BaseRef(base.source, base.revision, base.family, base.version), base.fingerprint, placement,
                     beside=True)


def limit_lent_bases(slots: int | None) -> None:
    """This process's lender's ``limit``."""
    _LENDER.limit(slots)
