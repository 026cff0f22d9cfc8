"""The transfer contract: an adapter lands on a base whole, or is refused with the reason named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import base_info, char_tokenizer, copy_task, tiny_model
from transpeft.adapters import MANIFEST_NAME, WEIGHTS_NAME, AdapterFileError, Manifest, _sha256
from transpeft.methods import MethodConfig
from transpeft import defaults
from transpeft.train import TrainConfig, train_adapter
from transpeft.transfer import IncompatibleBase, load_adapter


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter on q/v of a tiny Llama (seed 0), and that base's info."""
    tok = char_tokenizer()
    info = base_info(tiny_model("llama"), tok)
    out = tmp_path_factory.mktemp("adapters") / "lora"
    train_adapter(tiny_model("llama"), tok, info, [copy_task(16, 4)],
                  MethodConfig(r=4, target_modules=("q_proj", "v_proj")), TrainConfig(steps=2, batch_size=8),
                  out, progress=False)
    return out, info


def copy_adapter(source, target, **manifest_changes):
    """A copy of an adapter folder, its manifest edited (forged adapters for the gate to catch)."""
    shutil.copytree(source, target)
    manifest = Manifest.from_json((target / MANIFEST_NAME).read_text())
    # Sealed again, as a forger would: what must catch it is the compatibility check.
    (target / MANIFEST_NAME).write_text(Manifest(**{**manifest.__dict__, **manifest_changes}).sealed().to_json())
    return target


def refusal(model, tokenizer, directory) -> str:
    with pytest.raises(IncompatibleBase) as caught:
        load_adapter(model, base_info(model, tokenizer, version="v2"), directory)
    return str(caught.value)


def test_transfer_to_a_newer_base_of_the_same_shape_loads(adapter):
    directory, _ = adapter
    newer = tiny_model("llama", seed=1)  # other weights, same architecture and tokenizer
    model = load_adapter(newer, base_info(newer, char_tokenizer(), version="v2"), directory)
    assert sum(1 for n, _ in model.named_modules() if n.endswith("lora_A")) == 4


def test_other_architecture_is_refused(adapter):
    assert "architecture: adapter was trained on LlamaForCausalLM" in refusal(
        tiny_model("qwen2"), char_tokenizer(), adapter[0])


def test_other_hidden_size_is_refused(adapter):
    message = refusal(tiny_model("llama", hidden_size=48), char_tokenizer(), adapter[0])
    assert "hidden size: adapter expects 32, base has 48" in message
    assert "target module model.layers.0.self_attn.q_proj: adapter expects (in, out) = (32, 32)" in message


def test_other_layer_count_is_refused(adapter):
    assert "layer count: adapter expects 2, base has 3" in refusal(
        tiny_model("llama", num_hidden_layers=3), char_tokenizer(), adapter[0])


def test_other_tokenizer_vocabulary_is_refused(adapter):
    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<sep>"]})
    assert "tokenizer: the base's vocabulary" in refusal(tiny_model("llama"), tok, adapter[0])


def test_missing_target_module_is_refused(adapter, tmp_path):
    directory, _ = adapter
    targets = {**Manifest.from_json((directory / MANIFEST_NAME).read_text()).targets,
               "model.layers.0.self_attn.qkv_proj": [32, 96]}
    forged = copy_adapter(directory, tmp_path / "forged", targets=targets)
    assert "target module model.layers.0.self_attn.qkv_proj: not present" in refusal(
        tiny_model("llama"), char_tokenizer(), forged)


def test_a_saved_weight_that_matches_no_module_is_an_error_not_a_warning(adapter, tmp_path):
    weights = load_file(str(adapter[0] / WEIGHTS_NAME))
    weights["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(weights, str(tmp_path / "extra.safetensors"))
    forged = copy_adapter(adapter[0], tmp_path / "extra", weights_sha256=_sha256(tmp_path / "extra.safetensors"))
    shutil.copy(tmp_path / "extra.safetensors", forged / WEIGHTS_NAME)  # with a checksum that matches it
    base = tiny_model("llama")
    assert "saved weights matched no module of the base" in refusal(base, char_tokenizer(), forged)
    assert not any("lora" in n for n, _ in base.named_modules())  # the refused load left the base clean


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / MANIFEST_NAME).unlink(), "transpeft.json is missing"),
    (lambda d: (d / WEIGHTS_NAME).unlink(), "adapter_model.safetensors is missing"),
    (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    (lambda d: (d / MANIFEST_NAME).write_text("{not json"), "transpeft.json is unreadable"),
    (lambda d: (d / MANIFEST_NAME).write_text((d / MANIFEST_NAME).read_text().replace(
        '"fingerprint": "sha256:', '"fingerprint": "sha256:0')), "transpeft.json was edited after the adapter was saved"),
    (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:40]), "is corrupt"),
    (lambda d: (d / WEIGHTS_NAME).write_bytes(_flip_last_byte((d / WEIGHTS_NAME).read_bytes())),
     "does not match the checksum"),
])
def test_missing_or_corrupt_adapter_files_are_refused(adapter, tmp_path, damage, match):
    directory, info = adapter
    copy = copy_adapter(directory, tmp_path / "copy")
    damage(copy)
    with pytest.raises(AdapterFileError, match=match):
        load_adapter(tiny_model("llama"), info, copy)


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def test_missing_adapter_folder_is_refused(tmp_path):
    with pytest.raises(AdapterFileError, match="no such folder"):
        load_adapter(tiny_model("llama"), base_info(tiny_model("llama"), char_tokenizer()), tmp_path / "nope")


def test_manifest_records_base_data_method_and_versions(adapter):
    directory, info = adapter
    raw = json.loads((directory / MANIFEST_NAME).read_text())
    assert raw["base"]["fingerprint"] == info.fingerprint and raw["base"]["fingerprint"].startswith("sha256:")
    assert raw["dataset_hash"].startswith("sha256:") and raw["tasks"] == ["copy"]
    assert raw["method"]["name"] == "lora" and raw["seed"] == 0
    assert (raw["p_i"], raw["p_c"]) == (defaults.P_I, defaults.P_C)  # the study's choice is the default
    assert set(raw["library_versions"]) >= {"torch", "transformers", "peft", "accelerate", "transpeft"}
    assert raw["metrics"]["copy"]["n"] == 4


def _failing_load(monkeypatch, error: BaseException):
    from transpeft import methods

    def load(*args, **kwargs):
        raise error

    monkeypatch.setitem(methods.METHODS, "lora", methods.Method(**{**methods.METHODS["lora"].__dict__, "load": load}))


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
])
def test_out_of_memory_or_a_runtime_error_while_loading_is_a_crash_not_incompatible(adapter, monkeypatch, error):
    directory, info = adapter
    _failing_load(monkeypatch, error)
    with pytest.raises(type(error)) as raised:
        load_adapter(tiny_model("llama"), info, directory)
    assert not isinstance(raised.value, IncompatibleBase)


def test_a_shape_mismatch_found_while_loading_is_incompatible(adapter, tmp_path):
    directory, info = adapter
    forged = copy_adapter(directory, tmp_path / "rank")
    config = json.loads((forged / "adapter_config.json").read_text())
    (forged / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] * 2}))  # weights keep r
    with pytest.raises(IncompatibleBase, match="size mismatch"):
        load_adapter(tiny_model("llama"), info, forged)


def test_lora_adapters_in_shared_batches_score_as_one_at_a_time_and_a_bad_one_is_refused_alone(adapter, tmp_path):
    from transpeft.adapters import read_manifest
    from transpeft.transfer import score_adapter, score_adapters, unload_adapter

    tok, model = char_tokenizer(), tiny_model("llama")
    info, task = base_info(model, tok), copy_task(32, 16)
    jobs = {}
    for i, (targets, steps) in enumerate(((("q_proj", "v_proj"), 10), (("q_proj", "v_proj"), 30), (("o_proj",), 20))):
        trained, manifest, _ = train_adapter(model, tok, info, [task], MethodConfig(r=4, target_modules=targets),
                                             TrainConfig(steps=steps, batch_size=8, seed=i), tmp_path / f"a{i}",
                                             progress=False)
        model = unload_adapter(trained, "lora")
        jobs[f"a{i}"] = (tmp_path / f"a{i}", manifest, [task])
    alone = {key: score_adapter(model, tok, info, folder, tasks, manifest)[task.name]
             for key, (folder, manifest, tasks) in jobs.items()}
    bad = copy_adapter(adapter[0], tmp_path / "bad", targets={"model.layers.0.self_attn.nope": [32, 32]})
    jobs = {"a0": jobs["a0"], "bad": (bad, read_manifest(bad), [task]), **jobs}

    shared = score_adapters(model, tok, info, jobs, share_batches=True)

    assert isinstance(shared["bad"], IncompatibleBase) and "nope" in str(shared["bad"])
    for key, metrics in alone.items():  # each row went through its own adapter, and only through it
        got = shared[key][task.name]
        assert (got.exact_match, got.token_accuracy, got.n) == (metrics.exact_match, metrics.token_accuracy, metrics.n)
        assert got.answer_loss == pytest.approx(metrics.answer_loss, rel=1e-4)
    assert len({round(m.answer_loss, 4) for m in alone.values()}) == 3  # three different adapters
    assert not any("lora" in name for name, _ in model.named_modules())  # the base is bare again
