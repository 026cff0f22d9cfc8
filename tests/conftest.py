"""Shared fixtures: a character tokenizer and tiny models of every supported architecture."""

from __future__ import annotations

import os
import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from transpeft.bases import BaseInfo, fingerprint, signature
from transpeft.data import Example, Task

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

SPECIALS = ["<pad>", "<bos>", "<eos>"]
CHARS = list(string.ascii_lowercase + string.digits + " :=+>|,.?")


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


VOCAB = len(SPECIALS) + len(CHARS)
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               initializer_range=0.2)  # sharper logits than 0.02, so a few steps visibly learn
ARCH_CONFIGS = {
    "llama": dict(_COMMON, num_key_value_heads=2),
    "qwen2": dict(_COMMON, num_key_value_heads=2),
    "mistral": dict(_COMMON, num_key_value_heads=2),
    "gemma": dict(_COMMON, num_key_value_heads=2, head_dim=8),
    "phi3": dict(_COMMON, num_key_value_heads=2),
    "gpt_neox": _COMMON,
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
ARCHS = list(ARCH_CONFIGS)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **{**ARCH_CONFIGS[arch], **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def base_info(model, tokenizer, version: str = "v1", family: str = "tiny") -> BaseInfo:
    return BaseInfo(family=family, version=version, source=f"memory:{family}/{version}", revision=None,
                    fingerprint=fingerprint(model, tokenizer), signature=signature(model, tokenizer))


def copy_task(n_train: int = 64, n_eval: int = 16, seed: int = 0) -> Task:
    """Echo a short string back: learnable by a tiny model in a few dozen steps."""
    rng = torch.Generator().manual_seed(seed)

    def rows(n):
        out = []
        for _ in range(n):
            word = "".join(string.ascii_lowercase[i] for i in torch.randint(0, 6, (3,), generator=rng).tolist())
            out.append(Example(prompt=f"copy {word} >", answer=word))
        return tuple(out)

    return Task("copy", "manipulation", "echo three letters", rows(n_train), rows(n_eval), "sha256:test")


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1, fresh for each test module that asks."""
    from servers import start_mlflow

    server = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """The API URL of a real Prefect server on 127.0.0.1 (SQLite), one for the whole session: it takes ~10 s
    to start. Tests share it, so each should use its own base family or version."""
    from servers import start_prefect

    server = start_prefect(tmp_path_factory.mktemp("prefect"))
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def prefect_api(prefect_server):
    """Flow runs of this process, and of Dask worker processes it starts, go to the test Prefect server
    (the session's, or the one a module starts as its own ``prefect_server``)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    patch = pytest.MonkeyPatch()
    patch.setenv("PREFECT_API_URL", prefect_server)
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server
    patch.undo()


@pytest.fixture(scope="session")
def transfer_deployment(prefect_server, tmp_path_factory):
    """The id of prefect.yaml's `transfer-on-base-update/all-adapters`, with its event trigger, deployed on the
    session's Prefect server from the project root as `make up` deploys it. No worker runs, so the runs its
    trigger creates stay scheduled: what they do is tested by calling the flow."""
    from servers import deploy, prefect_api
    from transpeft.events import TRANSFER_DEPLOYMENT

    # Only this deployment: `--all` takes ~40 s here, each deployment's build steps import the library.
    deploy(prefect_server, tmp_path_factory.mktemp("prefect-client"), TRANSFER_DEPLOYMENT)
    return prefect_api(prefect_server, f"/deployments/name/{TRANSFER_DEPLOYMENT}")["id"]
