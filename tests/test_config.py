"""The configuration models (transpeft.config) and params.yaml's loader (transpeft.params): one set of
typed models, one probability rule, errors that name their key."""

from __future__ import annotations

import copy
import pickle
import re
import subprocess
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import get_args

import pytest
import yaml

from transpeft import config
from transpeft.config import BottleneckConfig, ConfigError, MethodConfig, StudyConfig, TrainConfig
from transpeft.params import BASES, Bases, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def load(tmp_path, change) -> object:
    raw = copy.deepcopy(RAW)
    change(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def _set(dotted: str, value):
    def change(raw):
        *parents, last = dotted.split(".")
        for part in parents:
            raw = raw[part]
        raw[last] = value
    return change


@pytest.mark.parametrize("key,value,message", [
    ("train.runs.transpeft-v1.p_c", 1.5, r"train.runs.transpeft-v1.p_c must be in \[0, 1\), got 1.5"),
    ("train.runs.transpeft-v1.base", "v9", "train.runs.transpeft-v1.base 'v9' is not in bases.versions"),
    ("train.runs.transpeft-v1.pc", 0.1, r"unknown key train.runs.transpeft-v1.pc \(known: base, p_c, p_i\)"),
    ("train.runs", {}, "train.runs is empty; name at least one run"),
    ("train.schedule.steps", 0, "train.schedule.steps must be >= 1, got 0"),
    ("train.schedule.p_c", 0.1, "train.schedule may not set p_c: each run sets its own"),
    ("train.method.name", "prefix", "train.method.name must be 'lora', 'dora', 'ia3' or 'bottleneck', got 'prefix'"),
    ("gate.strategies", ["direct", "ignore"],
     "gate.strategies.1 must be 'direct', 'scaled', 'distill' or 'retune', got 'ignore'"),
    ("gate.strategies", [], "gate.strategies is empty; list at least direct"),
    ("gate.on_fail", "flag", r"gate on_fail is now strategies, the ways tried in order: on_fail: retune is "
                             r"strategies: \[direct, retune\], on_fail: flag is strategies: \[direct\]"),
    ("gate.held_out", 1.0, r"gate.held_out must be in \(0, 1\), got 1.0"),
    ("gate.seed_examples", 9, r"gate.seed_examples must be in \[1, 8\], got 9"),
    ("gate.retune_p_i", 1.0, r"gate.retune_p_i must be in \[0, 1\), got 1.0"),
    ("gate.min_score", "high", "gate.min_score must be a valid number"),
    ("nightly.cron", "0 2 * *", "nightly.cron must be a 5-field cron expression, got '0 2 \\* \\*'"),
    ("fanout.task_runner", "ray", "fanout.task_runner must be 'threads' or 'dask', got 'ray'"),
    ("fanout.max_workers", 0, "fanout.max_workers must be >= 1, got 0"),
    ("study.updates", ["v1->v9"], "study.updates names v9, not in bases.versions"),
    ("study.grid", [["qkvo", 0.0, 0.0], ["qkvo", 0.0, 1.0]], r"study.grid.1.2 must be in \[0, 1\), got 1.0"),
    ("placement.dtype", "half", "placement: dtype 'half': use auto"),
    ("prepare.n_train", "many", "prepare.n_train must be a valid integer"),
    ("trian", {}, "unknown key trian"),
])
def test_a_bad_value_fails_on_load_naming_its_dotted_key(tmp_path, key, value, message):
    with pytest.raises(ParamsError, match=r"/params.yaml: " + message):
        load(tmp_path, _set(key, value))


def test_a_missing_key_is_named(tmp_path):
    with pytest.raises(ParamsError, match="params.yaml: missing key bases.family"):
        load(tmp_path, lambda raw: raw["bases"].pop("family"))
    with pytest.raises(ParamsError, match="params.yaml: missing key gate"):
        load(tmp_path, lambda raw: raw.pop("gate"))


def test_empty_sections_take_their_defaults_and_yaml_lists_become_tuples(tmp_path):
    params = load(tmp_path, lambda raw: raw.update(nightly=None, fanout=None, placement=None, study=None))
    assert params.nightly.cron == "0 2 * * *" and params.fanout.task_runner == "threads" and params.study is None
    params = load_params(ROOT / "params.yaml")
    assert params.bases.versions == ("v1", "v2", "v3") and params.study.grid[0] == ("qkvo", 0.0, 0.0)


def test_a_run_is_the_schedule_with_its_own_regularisers():
    params = load_params(ROOT / "params.yaml")
    schedule = RAW["train"]["schedule"]
    for name, spec in RAW["train"]["runs"].items():
        assert asdict(params.train.config(name)) == asdict(TrainConfig(**schedule, p_c=spec["p_c"], p_i=spec["p_i"]))


def test_cron_is_printed_for_prefect_yaml():
    done = subprocess.run([sys.executable, "-m", "transpeft.params", "nightly.cron"], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0 and done.stdout == RAW["nightly"]["cron"] + "\n"


def test_base_refs_come_from_the_bases_section():
    demo = Bases(family="demo", versions=("v1", "v2"))
    ref = demo.ref("v2")
    assert (ref.source, ref.revision, ref.family, ref.version) == (str(BASES / "v2"), None, "demo", "v2")
    real = Bases(family="qwen", versions=("v1", "v2"), sources={"v1": "Qwen/Qwen2-0.5B@abc123", "v2": "/models/q"})
    assert (real.ref("v1").source, real.ref("v1").revision) == ("Qwen/Qwen2-0.5B", "abc123")
    assert (real.ref("v2").source, real.ref("v2").revision, real.ref("v2").version) == ("/models/q", None, "v2")


def test_params_loads_without_the_training_stack():
    code = ("import sys, transpeft.params, transpeft.config; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft', 'accelerate') "
            "or m in ('transpeft.train', 'transpeft.study', 'transpeft.methods', 'transpeft.stages')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# -- the models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make,message", [
    (lambda: TrainConfig(p_c=1.0), r"p_c must be in \[0, 1\), got 1.0"),
    (lambda: TrainConfig(p_i=-0.1), r"p_i must be in \[0, 1\), got -0.1"),
    (lambda: TrainConfig(steps=0, lr=0), "steps must be >= 1, got 0; lr must be > 0, got 0"),
    (lambda: TrainConfig(bogus=1), r"unknown key bogus \(known: batch_size, "),
    (lambda: MethodConfig(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (lambda: BottleneckConfig(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (lambda: BottleneckConfig(sublayers=("mlp",)), "sublayers.0 must be 'attention' or 'ffn', got 'mlp'"),
    (lambda: BottleneckConfig(non_linearity="swish"), "non_linearity must be 'relu', 'gelu', 'silu' or 'tanh'"),
    (lambda: replace(TrainConfig(), p_c=1.0), r"p_c must be in \[0, 1\)"),  # replace validates again
])
def test_one_rule_per_value_and_the_error_names_the_field(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_configs_are_frozen_picklable_dataclasses_whose_dicts_keep_their_values():
    from dataclasses import FrozenInstanceError

    config_ = TrainConfig(lr=1, warmup=0, p_c=0)  # whole numbers where floats are declared stay as written
    assert asdict(config_)["lr"] == 1 and type(asdict(config_)["lr"]) is int and type(config_.p_c) is int
    assert list(asdict(TrainConfig())) == [f.name for f in fields(TrainConfig)] == [
        "steps", "batch_size", "grad_accum", "lr", "warmup", "weight_decay", "max_grad_norm", "p_i", "p_c", "seed",
        "gradient_checkpointing", "precision", "max_length", "too_long", "group_by_length"]  # the manifest's keys
    assert list(MethodConfig().__dict__) == ["name", "r", "alpha", "dropout", "target_modules", "variant"]
    assert MethodConfig(target_modules=["q_proj"]).target_modules == ("q_proj",)
    for value in (TrainConfig(p_c=0.1), MethodConfig(r=4), load_params(ROOT / "params.yaml")):
        assert pickle.loads(pickle.dumps(value)) == value  # sent to Dask workers and study processes
    with pytest.raises(FrozenInstanceError):
        TrainConfig().steps = 5
    error = pickle.loads(pickle.dumps(ConfigError("p_c must be in [0, 1), got 1.0")))
    assert str(error) == "p_c must be in [0, 1), got 1.0"


def test_the_choices_are_those_the_library_implements():
    from transpeft import batching, bottleneck, methods

    assert get_args(config.MethodName) == tuple(methods.METHODS)
    assert get_args(config.Activation) == tuple(bottleneck.ACTIVATIONS)
    assert get_args(config.TooLong) == batching.TOO_LONG
    assert bottleneck.SUBLAYERS == config.SUBLAYERS == ("attention", "ffn")


def test_study_targets_left_empty_mean_the_default_as_before():
    study = StudyConfig(tasks=("a",), updates=("v1->v2",), targets={"qkvo": [], "all": None},
                        grid=[["qkvo", 0, 0], ["qkvo", 0.1, 0]])
    assert study.targets == {"qkvo": None, "all": None} and study.grid == (("qkvo", 0, 0), ("qkvo", 0.1, 0))


def test_an_error_names_the_file_that_was_loaded(tmp_path):
    path = tmp_path / "staging.yaml"
    raw = copy.deepcopy(RAW)
    raw["gate"]["min_retention"] = "high"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=f"^{re.escape(str(path))}: gate.min_retention must be a valid number"):
        load_params(path)
