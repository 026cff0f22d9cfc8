"""The gate and one adapter's revalidation: transfer, judge, re-tune (warm start) or flag."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import base_info, char_tokenizer, copy_task, tiny_model
from transpeft.adapters import WEIGHTS_NAME, read_manifest
from transpeft.data import Example, load_tasks, write_task
from transpeft.methods import MethodConfig
from transpeft.params import Gate
from transpeft.report import write_report
from transpeft.revalidate import Candidate, judge, revalidate
from transpeft.tracking import AdapterRecord
from transpeft.train import TrainConfig, train_adapter

GATE = Gate(min_retention=0.8, min_score=0.5, beat_zero_shot=True, strategies=("direct", "retune"), retune_steps=30)


def test_gate_passes_only_when_every_rule_holds_on_every_task():
    assert judge({"a": 0.9, "b": 0.6}, {"a": 1.0, "b": 0.7}, {"a": 0.1, "b": 0.0}, GATE).passed
    verdict = judge({"a": 0.7, "b": 0.4}, {"a": 1.0, "b": 0.4}, {"a": 0.0, "b": 0.4}, GATE)
    assert not verdict.passed
    assert verdict.reasons == ("a: retention 0.70 < 0.8 (0.700 vs 1.000 on the old base)",
                               "b: exact match 0.400 < 0.5",
                               "b: 0.400 does not beat the new base's zero-shot 0.400")
    assert judge({"a": 0.4}, {"a": 0.5}, {"a": 0.4}, replace(GATE, min_score=0.0, beat_zero_shot=False)).passed
    assert judge({"a": 0.0}, {"a": 0.0}, {}, replace(GATE, min_score=0.0, beat_zero_shot=False)).passed  # 0 of 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An adapter that learned a constant answer on one tiny base, and a second base it fails on."""
    root = tmp_path_factory.mktemp("revalidate")
    source = copy_task(32, 8)
    rows = lambda examples: [Example(e.prompt, "yes") for e in examples]  # noqa: E731 - learnable in 30 steps
    write_task(root / "data" / "ack", "ack", "manipulation", "always answer yes", rows(source.train), rows(source.eval))
    tokenizer, old = char_tokenizer(), tiny_model(seed=0)
    task = load_tasks(root / "data", ["ack"])[0]
    _, manifest, _ = train_adapter(old, tokenizer, base_info(old, tokenizer, "v1"), [task], MethodConfig(r=4),
                                   TrainConfig(steps=30, batch_size=8, lr=2e-2), root / "adapter", progress=False)
    assert manifest.metrics["ack"]["exact_match"] == 1.0
    record = AdapterRecord("ack-bot", "tiny", "v1", "trained", None, {"ack": 1.0}, "1", True, "run")
    return SimpleNamespace(root=root, tokenizer=tokenizer, candidate=Candidate.registered(record))


def new_base(trained, **overrides):
    model = tiny_model(seed=1, **overrides)
    return SimpleNamespace(model=model, tokenizer=trained.tokenizer, info=base_info(model, trained.tokenizer, "v2"))


def lora_layers(model: nn.Module) -> int:
    return sum("lora" in name for name, _ in model.named_modules())


def test_failing_adapter_is_retuned_from_its_transferred_weights(trained):
    slot = new_base(trained)
    outcome = revalidate(slot, trained.root / "adapter", trained.candidate, trained.root / "data", GATE,
                         trained.root / "work")
    assert outcome.decision == "retuned"
    assert outcome.new == {"ack": 0.0} and outcome.zero_shot == {"ack": 0.0} and outcome.retuned == {"ack": 1.0}
    assert outcome.reasons[-1] == "retune: passes (used 32 labels, 30 steps)" and outcome.strategy == "retune"
    assert outcome.line() == f"{trained.candidate.name}: retuned (direct 0.0 ✗, retune 100.0 ✓), labels: yes"
    retuned = read_manifest(outcome.adapter_dir)
    assert retuned.base.version == "v2" and retuned.training["steps"] == 30
    assert (retuned.p_c, retuned.p_i) == (GATE.retune_p_c, GATE.retune_p_i)  # Trans-PEFT again
    assert retuned.training["warm_start"] == str(trained.root / "adapter")
    assert load_file(f"{outcome.adapter_dir}/{WEIGHTS_NAME}").keys() == load_file(
        str(trained.root / "adapter" / WEIGHTS_NAME)).keys()
    assert lora_layers(slot.model) == 0  # the lent base comes back bare


def test_a_bf16_base_is_scored_and_retuned_in_bf16(trained):
    slot = new_base(trained)
    slot.model.to(torch.bfloat16)
    seen = set()
    down = slot.model.model.layers[0].mlp.down_proj  # runs in zero-shot, transferred scoring and re-tuning
    hook = down.register_forward_pre_hook(lambda module, args: seen.add((module.weight.dtype, args[0].dtype)))
    try:
        outcome = revalidate(slot, trained.root / "adapter", trained.candidate, trained.root / "data", GATE,
                             trained.root / "work-bf16")
    finally:
        hook.remove()
    assert outcome.retuned is not None and outcome.placement == "cpu bfloat16"
    assert read_manifest(trained.root / "work-bf16" / "ack-bot-retuned").training["placement"] == "cpu bfloat16"
    assert seen == {(torch.bfloat16, torch.bfloat16)}


def test_flag_policy_keeps_the_transferred_adapter_unchanged(trained):
    slot = new_base(trained)
    outcome = revalidate(slot, trained.root / "adapter", trained.candidate, trained.root / "data",
                         replace(GATE, strategies=("direct",)), trained.root / "work-flag")
    assert outcome.decision == "flagged" and outcome.retuned is None and "retune" not in outcome.seconds
    assert outcome.adapter_dir == str(trained.root / "adapter")
    assert lora_layers(slot.model) == 0


def test_incompatible_base_fails_with_each_mismatch(trained):
    slot = new_base(trained, hidden_size=48)
    outcome = revalidate(slot, trained.root / "adapter", trained.candidate, trained.root / "data", GATE,
                         trained.root / "work-bad")
    assert outcome.decision == "failed" and outcome.adapter_dir is None
    assert any("hidden size: adapter expects 32, base has 48" in r for r in outcome.reasons)
    assert outcome.line().startswith(f"{trained.candidate.name}: failed: incompatible with ")


def test_missing_task_data_fails_with_the_path(trained, tmp_path):
    outcome = revalidate(new_base(trained), trained.root / "adapter", trained.candidate, tmp_path, GATE, tmp_path)
    assert outcome.decision == "failed" and "ack" in outcome.reasons[0]


def test_report_of_an_empty_registry_is_a_table_without_a_heatmap(tmp_path):
    """The first base of a family is revalidated before any adapter exists."""
    written = write_report({}, tmp_path, "Transfer report: demo up to v1")
    assert [p.name for p in written] == ["transfer_report.md", "transfer_report.csv"]
    assert "| adapter |" in written[0].read_text()
