"""The ways to carry an adapter over (transpeft/strategies.py), each judged by the gate in its turn."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_info, char_tokenizer, copy_task, tiny_model
from transpeft.adapters import WEIGHTS_NAME, read_manifest, save_adapter
from transpeft.data import Example, load_tasks, write_task
from transpeft.methods import MethodConfig
from transpeft.params import Gate
from transpeft.revalidate import Candidate, revalidate
from transpeft.strategies import sample_prompts, split_eval
from transpeft.tracking import AdapterRecord
from transpeft.train import TrainConfig, train_adapter
from transpeft.transfer import load_adapter, unload_adapter

GATE = Gate(min_retention=0.8, min_score=0.5, beat_zero_shot=True, retune_steps=30, distill_steps=40,
            prompts_per_task=32)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """An adapter that learned to answer "yes" on one tiny base, and a second base it fails on. The task's
    stored training answers are then overwritten with "zz": whatever learns "yes" from them did not
    learn it from the labels."""
    root = tmp_path_factory.mktemp("strategies")
    source = copy_task(32, 16)
    yes = lambda examples: [Example(e.prompt, "yes") for e in examples]  # noqa: E731
    write_task(root / "trained-on" / "ack", "ack", "manipulation", "answer yes", yes(source.train), yes(source.eval))
    tokenizer, old = char_tokenizer(), tiny_model(seed=0)
    old_info = base_info(old, tokenizer, "v1")
    task = load_tasks(root / "trained-on", ["ack"])[0]
    adapted, manifest, _ = train_adapter(old, tokenizer, old_info, [task], MethodConfig(r=4),
                                         TrainConfig(steps=30, batch_size=8, lr=2e-2), root / "adapter", progress=False)
    unload_adapter(adapted, "lora")  # old is the bare base again
    assert manifest.metrics["ack"]["exact_match"] == 1.0
    wrong = [Example(e.prompt, "zz") for e in source.train]
    write_task(root / "data" / "ack", "ack", "manipulation", "answer yes", wrong, yes(source.eval))
    record = AdapterRecord("ack-bot", "tiny", "v1", "trained", None, {"ack": 1.0}, "1", True, "run")

    @contextmanager
    def teacher():  # the old base, lent as the flow lends it: bare, and handed back bare
        slot = SimpleNamespace(model=old, tokenizer=tokenizer, info=old_info)
        yield slot
        assert not any("lora" in n for n, _ in slot.model.named_modules())

    return SimpleNamespace(root=root, tokenizer=tokenizer, old=old, old_info=old_info, teacher=teacher,
                           candidate=Candidate.registered(record))


def new_base(fleet):
    model = tiny_model(seed=1)
    return SimpleNamespace(model=model, tokenizer=fleet.tokenizer, info=base_info(model, fleet.tokenizer, "v2"))


def test_the_held_out_rows_are_the_same_every_time_and_never_the_gates():
    task = copy_task(8, 200)
    held, kept = split_eval(task, 0.25)
    assert (held, kept) == split_eval(replace(task, train=()), 0.25)  # by the rows alone
    assert 30 <= len(held) <= 70 and len(held) + len(kept) == 200
    assert sorted(map(repr, held + kept)) == sorted(map(repr, task.eval))
    tiny = copy_task(8, 2, seed=3)
    assert [len(side) for side in split_eval(tiny, 0.25)] == [1, 1]  # one row each side, at least


def test_distill_on_stored_prompts_carries_the_adapter_without_a_label(fleet):
    gate = replace(GATE, strategies=("direct", "distill"))
    slot = new_base(fleet)
    outcome = revalidate(slot, fleet.root / "adapter", fleet.candidate, fleet.root / "data", gate,
                         fleet.root / "work-distill", teacher=fleet.teacher)
    assert outcome.new["ack"] == 0.0 and outcome.decision == "distilled" and outcome.strategy == "distill"
    assert outcome.retuned["ack"] >= 0.8  # "yes", which no stored answer says: learned from the teacher
    direct, distill = outcome.attempts
    assert (direct["strategy"], direct["passed"]) == ("direct", False)
    prompts = len({ex.prompt for ex in load_tasks(fleet.root / "data", ["ack"])[0].train})
    assert distill["used"] == {"labels": 0, "prompts": prompts} and distill["steps"] == 40 and distill["passed"]
    made = read_manifest(outcome.adapter_dir)
    assert made.base.version == "v2" and made.training["strategy"] == "distill"
    assert (made.p_c, made.p_i) == (gate.retune_p_c, gate.retune_p_i)  # Trans-PEFT's regularisers on
    assert made.training["warm_start"] == str(fleet.root / "adapter")
    assert not any("lora" in n for n, _ in slot.model.named_modules())


def test_retune_learns_the_stored_labels_where_distill_does_not_need_them(fleet):
    """The same adapter re-tuned on the "zz" labels learns "zz", and fails the gate's "yes"."""
    slot = new_base(fleet)
    outcome = revalidate(slot, fleet.root / "adapter", fleet.candidate, fleet.root / "data",
                         replace(GATE, strategies=("direct", "retune")), fleet.root / "work-retune")
    assert outcome.decision == "flagged" and outcome.strategy == ""
    assert outcome.attempts[-1]["strategy"] == "retune" and outcome.attempts[-1]["used"] == {"labels": 32}
    assert outcome.adapter_dir == str(fleet.root / "adapter")  # kept as transferred, unserved


def test_synthetic_prompts_come_from_the_old_base_after_at_most_eight_seeds(fleet):
    seeds = [f"copy {w} >" for w in ("abc", "bcd", "cde", "def", "aab")]
    prompts = sample_prompts(fleet.old, fleet.tokenizer, seeds, 16, __import__("random").Random(0))
    assert prompts and all(p.endswith(">") and p not in seeds for p in prompts)
    assert len(set(prompts)) == len(prompts) <= 16

    gate = replace(GATE, strategies=("direct", "distill"), prompts="synthetic", seed_examples=4)
    outcome = revalidate(new_base(fleet), fleet.root / "adapter", fleet.candidate, fleet.root / "data", gate,
                         fleet.root / "work-synthetic", teacher=fleet.teacher)
    used = outcome.attempts[-1]["used"]
    assert used["labels"] == 0 and used["seed_examples"] == 4 and used["synthetic_prompts"] > 0
    assert "prompts" not in used


def test_distill_without_an_old_base_does_not_apply_and_the_next_strategy_is_tried(fleet):
    slot = new_base(fleet)
    outcome = revalidate(slot, fleet.root / "adapter", fleet.candidate, fleet.root / "data",
                         replace(GATE, strategies=("direct", "distill", "retune")), fleet.root / "work-none")
    assert [a["strategy"] for a in outcome.attempts] == ["direct", "distill", "retune"]
    assert "distill: does not apply (no old base to learn from" in "; ".join(outcome.reasons)


def overshooting(fleet, folder, factor: float):
    """The adapter with its LoRA update (B) multiplied by ``factor``, saved as an adapter of its own."""
    manifest = read_manifest(fleet.root / "adapter")
    model = load_adapter(tiny_model(seed=0), fleet.old_info, fleet.root / "adapter", manifest)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.mul_(factor)
    save_adapter(model, folder, manifest)
    return folder


def test_scaled_picks_its_alpha_on_held_out_rows_and_is_judged_on_the_others(fleet, monkeypatch):
    """An update four times too large on its own base: alpha 0.25 undoes it, and only held-out rows chose it."""
    import transpeft.strategies as strategies

    folder = overshooting(fleet, fleet.root / "overshot", 4.0)
    task = load_tasks(fleet.root / "data", ["ack"])[0]
    held, kept = split_eval(task, GATE.held_out)
    scored = []
    real = strategies.evaluate
    monkeypatch.setattr(strategies, "evaluate", lambda model, tok, rows, *a: scored.append(list(rows)) or
                        real(model, tok, rows, *a))
    old_base = SimpleNamespace(model=fleet.old, tokenizer=fleet.tokenizer, info=fleet.old_info)
    gate = replace(GATE, strategies=("direct", "scaled"), beat_zero_shot=False)
    outcome = revalidate(old_base, folder, fleet.candidate, fleet.root / "data", gate, fleet.root / "work-scaled")

    assert outcome.new["ack"] < 0.8 and outcome.decision == "scaled", outcome.reasons
    scaled = outcome.attempts[-1]
    assert scaled["note"].startswith("alpha 0.25") and scaled["used"] == {"labels": len(held)}
    assert all(rows in (held, kept) for rows in scored) and scored.count(held) == 1 + len(GATE.alphas)
    assert scored[-1] == kept  # the chosen alpha judged on the gate's rows only
    made = read_manifest(outcome.adapter_dir)
    assert made.training["scaled_by"] == 0.25
    original, now = (load_file(str(Path(f) / WEIGHTS_NAME)) for f in (fleet.root / "adapter", outcome.adapter_dir))
    for key in original:
        assert torch.allclose(now[key], original[key], atol=1e-6)  # B * 4 * 0.25, A as it was


def test_scaled_that_finds_no_better_alpha_than_one_makes_no_candidate(fleet):
    old_base = SimpleNamespace(model=fleet.old, tokenizer=fleet.tokenizer, info=fleet.old_info)
    outcome = revalidate(old_base, fleet.root / "adapter", fleet.candidate, fleet.root / "data",
                         replace(GATE, strategies=("scaled",), beat_zero_shot=False, min_score=1.01),
                         fleet.root / "work-one")
    assert outcome.decision == "flagged" and outcome.attempts[-1]["note"].startswith("no alpha beats 1")


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "bottleneck"])
def test_scaled_finds_the_update_of_every_method(method):
    """Each method's parameters that ``scaled`` multiplies exist under the names it looks for."""
    from transpeft.methods import get_method
    from transpeft.strategies import _UPDATES

    model = get_method(method).attach(tiny_model(seed=0), MethodConfig(name=method, r=4))
    suffixes, _ = _UPDATES[method]
    assert any(name.endswith(suffixes) for name, _ in model.named_parameters())


def test_an_old_base_that_cannot_be_lent_leaves_distill_out_and_the_next_strategy_carries_on(fleet):
    from transpeft.bases import BaseLoadError

    @contextmanager
    def gone():
        raise BaseLoadError("base tiny/v1 at /models/v1 is not the registered one")
        yield

    outcome = revalidate(new_base(fleet), fleet.root / "adapter", fleet.candidate, fleet.root / "data",
                         replace(GATE, strategies=("direct", "distill", "retune")), fleet.root / "work-gone",
                         teacher=gone)
    assert [a["strategy"] for a in outcome.attempts] == ["direct", "distill", "retune"]
    assert "distill: does not apply (no teacher: base tiny/v1 at /models/v1 is not the registered one)" in \
        "; ".join(outcome.reasons)
