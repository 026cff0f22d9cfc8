"""The demo base family and demo tasks, built with the tiny test profile."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from transpeft.data import load_tasks
from transpeft.demo.family import build_demo_family
from transpeft.demo.tasks import ADDITIONS, build_demo_tasks
from transpeft.demo.world import VERSIONS, world


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("family")
    build_demo_family(out, profile="test", progress=False)
    return out


def test_every_version_loads_like_a_hub_model(family_dir):
    for version in VERSIONS:
        model = AutoModelForCausalLM.from_pretrained(family_dir / version)
        tok = AutoTokenizer.from_pretrained(family_dir / version)
        assert tok.is_fast
        assert type(model).__name__ == "LlamaForCausalLM"
        ids = tok("Q: reverse abc\nA: ", return_tensors="pt")["input_ids"]
        assert ids[0, 0].item() == tok.bos_token_id == model.config.bos_token_id
        logits = model(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], len(tok))
        assert torch.isfinite(logits).all()


def test_tokenizer_round_trips_text(family_dir):
    tok = AutoTokenizer.from_pretrained(family_dir / "v1")
    text = "Q: what is the pet of zorbo?\nA: owl  — ünïcode 47+8=55"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == len(text.encode())  # one token per byte
    assert {tok.eos_token_id, tok.bos_token_id, tok.pad_token_id} == {0, 1, 2}


def test_same_profile_builds_identical_weights(family_dir, tmp_path):
    build_demo_family(tmp_path, profile="test", progress=False)
    for version in VERSIONS:
        first = load_file(family_dir / version / "model.safetensors")
        second = load_file(tmp_path / version / "model.safetensors")
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name], second[name]), f"{version}: {name} differs"


def test_updates_drift_and_family_json_records_it(family_dir):
    v1 = load_file(family_dir / "v1" / "model.safetensors")
    v2 = load_file(family_dir / "v2" / "model.safetensors")
    assert any(not torch.equal(v1[n], v2[n]) for n in v1)
    family = json.loads((family_dir / "family.json").read_text())
    assert family["profile"] == "test"
    assert set(family["versions"]) == set(VERSIONS)
    assert all(v["tokens"] > 0 and v["seconds"] >= 0 for v in family["versions"].values())
    assert family["versions"]["v2"]["parent"] == "v1"
    for pair in ("v1->v2", "v2->v3"):
        similarity = family["similarity"][pair]
        assert len(similarity["layers"]) == 2 and all(-1 <= similarity[k] <= 1 for k in ("attention", "ffn"))
    for pair in ("v1->v2", "v2->v3"):
        drift = family["drift"][pair]
        assert set(drift) >= {"attention", "ffn", "all"}
        assert all(0 < d < 10 for d in drift.values())


def test_updates_change_churn_facts_but_not_the_asked_ones():
    v1, v2 = world("v1"), world("v2")
    asked = [(e, a) for e, a in v1.facts if e in v1.stable_entities]
    assert all(v1.facts[k] == v2.facts[k] for k in asked)
    assert any(v1.facts[k] != v2.facts[k] for k in v1.facts)
    assert set(v2.entities) > set(v1.entities)


def test_demo_tasks_cover_both_kinds_with_disjoint_eval(tmp_path):
    names = build_demo_tasks(tmp_path, seed=0, n_train=300, n_eval=50)
    tasks = load_tasks(tmp_path)
    assert len(tasks) >= 4 and {t.name for t in tasks} == set(names)
    kinds = {t.kind for t in tasks}
    assert "manipulation" in kinds and kinds & {"knowledge", "arithmetic"}
    for task in tasks:
        assert len(task.train) == 300 and len(task.eval) == 50
        assert not {e.prompt for e in task.eval} & {e.prompt for e in task.train}, task.name
        assert len({e.prompt for e in task.eval}) == len(task.eval), task.name
    reverse = next(t for t in tasks if t.name == "reverse")
    assert all(e.answer == e.prompt.split()[1].rstrip("?")[::-1] for e in reverse.eval)
    lookup = next(t for t in tasks if t.name == "lookup")
    assert not {e.prompt for e in lookup.eval} & {e.prompt for e in lookup.train}  # other facts...
    entities = lambda rows: {e.prompt.split()[0] for e in rows}  # noqa: E731
    assert entities(lookup.eval) & entities(lookup.train)  # ...of the same entities


def test_more_eval_rows_than_a_task_can_hold_out_fill_the_rest_and_every_train_split(tmp_path):
    """Asked for more eval rows than add and lookup have questions to hold out, each holds out what it
    can (add once drew forever past its 495 questions, and left train short from about 300) and still
    trains on the full n_train rows of other questions."""
    build_demo_tasks(tmp_path, n_train=2000, n_eval=1000)
    tasks = {t.name: t for t in load_tasks(tmp_path)}
    sizes = {name: len(task.eval) for name, task in tasks.items()}
    assert sizes == {"reverse": 1000, "sort": 1000, "lookup": 120, "add": ADDITIONS // 2}
    for task in tasks.values():
        assert len(task.train) == 2000, task.name
        assert not {e.prompt for e in task.eval} & {e.prompt for e in task.train}, task.name


def test_demo_tasks_are_deterministic_per_seed(tmp_path):
    build_demo_tasks(tmp_path / "a", seed=3, n_train=20, n_eval=10)
    build_demo_tasks(tmp_path / "b", seed=3, n_train=20, n_eval=10)
    build_demo_tasks(tmp_path / "c", seed=4, n_train=20, n_eval=10)
    a, b, c = (load_tasks(tmp_path / x) for x in "abc")
    assert [t.content_hash for t in a] == [t.content_hash for t in b]
    assert [t.content_hash for t in a] != [t.content_hash for t in c]


def test_pretraining_never_uses_the_task_format():
    from transpeft.demo.family import PROFILES, corpus_rows
    from transpeft.demo.tokenizer import demo_tokenizer
    import random

    tok = demo_tokenizer()
    for version in VERSIONS:
        rows = corpus_rows(version, 20, PROFILES["test"], tok, random.Random(0), new_format_share=0.5)
        text = tok.decode(rows.flatten().tolist())
        assert "?" not in text and "\n" not in text  # every task's question format is new to the bases
