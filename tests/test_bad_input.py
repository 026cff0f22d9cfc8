"""Bad input a new user gives: each a clear error naming the input and what to do, never a traceback,
and nothing accepted silently."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from transpeft.bases import BaseLoadError, BaseRef, describe_base, load_base
from transpeft.data import DataError, load_task, load_tasks
from transpeft.demo.family import build_demo_family
from transpeft.demo.tasks import build_demo_tasks
from transpeft.methods import MethodConfig
from transpeft.train import TrainConfig, train_adapter


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    build_demo_family(root / "bases", profile="test", progress=False)
    build_demo_tasks(root / "data", n_train=12, n_eval=4)
    return root


def broken_base(world, tmp_path, change):
    base = tmp_path / "base"
    shutil.copytree(world / "bases" / "v1", base)
    change(base)
    return BaseRef(str(base))


def test_a_truncated_base_weights_file_is_named(world, tmp_path):
    def truncate(base):
        weights = base / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    with pytest.raises(BaseLoadError, match="model.safetensors is truncated or corrupt.*download the base again"):
        describe_base(broken_base(world, tmp_path, truncate))


def test_a_config_that_disagrees_with_the_weights_is_named(world, tmp_path):
    def widen(base):
        config = json.loads((base / "config.json").read_text())
        config["intermediate_size"] *= 2
        (base / "config.json").write_text(json.dumps(config))

    with pytest.raises(BaseLoadError, match=r"config.json does not describe its weights \(\d+ tensors differ, e.g. "
                                            r"model.layers.0.mlp.\w+_proj.weight: weights"):
        load_base(broken_base(world, tmp_path, widen))


def test_a_folder_that_is_not_a_model_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(BaseLoadError, match="is not a model directory: it has no config.json"):
        describe_base(BaseRef(str(tmp_path)))


def test_non_utf8_bytes_in_a_jsonl_file_give_the_file_and_line(world, tmp_path):
    task = tmp_path / "reverse"
    shutil.copytree(world / "data" / "reverse", task)
    rows = (task / "train.jsonl").read_bytes().splitlines(keepends=True)
    rows[2] = rows[2].replace(b'"answer": "', b'"answer": "\xff')
    (task / "train.jsonl").write_bytes(b"".join(rows))
    with pytest.raises(DataError, match=rf"{task / 'train.jsonl'}:3: not UTF-8 \(byte 0xff at column \d+\)"):
        load_task(task)


def test_duplicate_rows_are_counted_and_warned_about_at_training(world, tmp_path, caplog):
    task = tmp_path / "data" / "reverse"
    shutil.copytree(world / "data" / "reverse", task)
    first = (task / "train.jsonl").read_text().splitlines()[0]
    with (task / "train.jsonl").open("a") as f:
        f.write((first + "\n") * 50)
    (loaded,) = load_tasks(tmp_path / "data")
    assert loaded.duplicates("train") == 50 and loaded.duplicates("eval") == 0
    model, tokenizer, v1 = load_base(BaseRef(str(world / "bases" / "v1")))
    with caplog.at_level(logging.WARNING, logger="transpeft.train"):
        # a batch larger than the data: said, and the manifest records what a batch really held
        _, manifest, _ = train_adapter(model, tokenizer, v1, [loaded], MethodConfig(r=2),
                                       TrainConfig(steps=1, batch_size=512), tmp_path / "adapter", progress=False)
    assert "reverse: 50 of 62 training rows repeat an earlier row" in caplog.text
    assert "batch_size 512 is larger than the 62 training rows" in caplog.text
    assert manifest.training["batch_size"] == 512 and manifest.training["batch_size_used"] == 62
