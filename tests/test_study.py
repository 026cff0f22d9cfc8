"""The transfer study: its settings' refusals, its arithmetic on known rows, and a real quick run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from transpeft.demo.family import build_demo_family
from transpeft.demo.tasks import build_demo_tasks
from transpeft.study import Inputs, StudyConfig, plan_grid, render, run_study
from transpeft.study_results import _index, choose, gap_closed, main_table, old_cost, retune_knee

ROW_KEYS = {"task", "update", "arm", "p_c", "p_i", "targets", "seed", "exact_match"}


GRID = (("qkvo", 0.0, 0.0), ("qkvo", 0.1, 0.0), ("qkvo", 0.2, 0.1), ("all-linear", 0.0, 0.0), ("all-linear", 0.1, 0.05))


def config(**changes) -> StudyConfig:
    return replace(StudyConfig(tasks=("reverse", "lookup"), updates=("v1->v2", "v1->v3"), grid=GRID), **changes)


@pytest.mark.parametrize("changes, message", [
    ({"updates": ("v1-v2",)}, "not 'old->new'"),
    ({"updates": ("v2->v2",)}, "not 'old->new'"),
    ({"updates": ()}, "updates is empty"),
    ({"tasks": ()}, "tasks is empty"),
    ({"seeds": (0, 0)}, "distinct"),
    ({"grid": (("qkvo", 0.1, 0.0),)}, "needs [qkvo, 0, 0]"),
    ({"grid": (("qkvo", 0.0, 0.0),)}, "no setting with p_c or p_i > 0"),
    ({"grid": (("qkvo", 0.0, 0.0), ("qkvo", 0.0, 1.0))}, "must be in [0, 1)"),
    ({"grid": (("attention", 0.0, 0.0), ("attention", 0.1, 0.0))}, "targets one of qkvo, all-linear"),
    ({"retune_steps": (0,)}, "positive"),
    ({"targets": {}}, "targets is empty"),
    ({"workers": 0}, "workers"),
    ({"r": 0}, "r must be >= 1, got 0"),
    ({"grid": (("qkvo", 0.0, 0.0), ("qkvo", 0.1))}, "missing item grid.1.2"),
])
def test_bad_settings_are_refused_with_what_to_fix(changes, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        config(**changes)


def test_plan_trains_every_cell_seed_and_task_once_on_the_old_base_and_fine_tunes_on_each_new_one():
    jobs = plan_grid(config())
    trains = [j for j in jobs if j.kind == "train"]
    assert len(trains) == 5 * 3 * 2 and all(j.base == "v1" and j.score_on == ("v2", "v3") for j in trains)
    assert len({(j.task, j.targets, j.p_c, j.p_i, j.seed) for j in trains}) == len(trains)
    assert len([j for j in jobs if j.kind == "ft_new"]) == 2 * 2 * 3 * 2  # new bases x targets x seeds x tasks


def _rows(values: dict[tuple, list[float]]) -> list[dict]:
    """{(update, task, arm, p_c): [exact match per seed]} -> rows, targets qkvo."""
    return [{"task": task, "update": update, "arm": arm, "p_c": p_c, "p_i": 0.0, "targets": "qkvo", "seed": seed,
             "exact_match": v} for (update, task, arm, p_c), per_seed in values.items() for seed, v in enumerate(per_seed)]


KNOWN = _rows({
    ("v1->v2", "reverse", "ft_old", 0.0): [1.0, 1.0], ("v1->v2", "reverse", "ft_old", 0.1): [0.99, 0.99],
    ("v1->v2", "reverse", "ft_old", 0.3): [0.80, 0.80],
    ("v1->v2", "reverse", "direct", 0.0): [0.50, 0.40], ("v1->v2", "reverse", "transpeft", 0.1): [0.90, 0.64],
    ("v1->v2", "reverse", "transpeft", 0.3): [0.95, 0.95], ("v1->v2", "reverse", "ft_new", 0.0): [1.0, 1.0],
    ("v1->v2", "reverse", "retune@10", 0.0): [0.6, 0.6], ("v1->v2", "reverse", "retune@50", 0.0): [0.98, 0.98],
    ("v1->v2", "reverse", "retune@10", 0.1): [0.9, 0.9], ("v1->v2", "reverse", "retune@50", 0.1): [0.97, 0.97],
})


def test_gap_closed_is_per_seed_share_of_direct_to_ft_new():
    cells = _index(KNOWN)
    assert gap_closed(cells, "v1->v2", "reverse", "qkvo", 0.1, 0.0) == pytest.approx([0.8, 0.4])
    assert old_cost(cells, "qkvo", 0.3, 0.0) == pytest.approx([0.2, 0.2])


def test_choice_keeps_to_the_old_base_budget_and_says_so_when_nothing_does():
    chosen = choose(KNOWN, max_old_cost=0.02)
    assert (chosen["p_c"], chosen["within_cost"]) == (0.1, True)  # p_c 0.3 transfers better but costs 20 points
    loose = choose(KNOWN, max_old_cost=0.5)
    assert loose["p_c"] == 0.3
    nothing = choose([r for r in KNOWN if r["p_c"] != 0.1], max_old_cost=0.02)
    assert not nothing["within_cost"] and "no setting stays within" in nothing["why"]


def test_knee_is_the_smallest_budget_reaching_95_percent_of_ft_new():
    chosen = {"targets": "qkvo", "p_c": 0.1, "p_i": 0.0}
    assert retune_knee(_index(KNOWN), chosen) == 50  # 10 steps: mean 0.75 < 0.95; 50 steps: 0.975


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    build_demo_family(root / "bases", profile="test", progress=False)
    build_demo_tasks(root / "data", n_train=32, n_eval=8)
    return root


def _inputs(root, workdir="work") -> Inputs:
    return Inputs(bases={v: str(root / "bases" / v) for v in ("v1", "v2", "v3")}, family="demo",
                  data=str(root / "data"), workdir=str(root / workdir))


def test_quick_study_writes_every_row_and_output_then_resumes_without_retraining(family):
    quick = replace(config().quick(), workers=1)
    lines = []
    summary = run_study(quick, _inputs(family), family / "out", say=lines.append)
    rows = json.loads((family / "out" / "results.json").read_text())
    assert rows and all(set(r) == ROW_KEYS for r in rows)
    arms = {r["arm"] for r in rows}
    assert arms == {"ft_old", "direct", "transpeft", "ft_new", "retune@2"}
    assert {r["update"] for r in rows} == {"v1->v2", "v1->v3"} and {r["seed"] for r in rows} == {0, 1}
    assert all(0.0 <= r["exact_match"] <= 1.0 for r in rows)
    for name in ("summary.json", "report.md", "gap_closed.png", "grid.png", "retune.png"):
        assert (family / "out" / name).stat().st_size > 0, name
    assert json.loads((family / "out" / "summary.json").read_text())["defaults"]["retune_steps"] == 2
    assert "| v1->v2 | reverse |" in main_table(summary)

    again = []
    assert run_study(quick, _inputs(family), family / "out2", say=again.append)["table"] == summary["table"]
    assert any("already done" in line for line in again)
    assert not any("] train on" in line for line in again)  # nothing retrained
    assert json.loads((family / "out2" / "results.json").read_text()) == rows

    (family / "out2" / "summary.json").unlink()  # every number of the summary comes from the raw rows alone
    assert render(rows, quick, family / "out2")["table"] == summary["table"]


def test_the_strategies_phase_carries_each_chosen_adapter_over_every_way_and_reports_what_it_took(family):
    from transpeft.study import run_strategies
    from transpeft.study_results import report

    names = ("scaled", "distill", "distill-synthetic", "retune")
    quick = replace(config(tasks=("reverse",), updates=("v1->v2",)).quick(), workers=1, strategies=names,
                    strategy_steps=2, prompts_per_task=4)
    summary = run_study(quick, _inputs(family, "ws"), family / "ws-out", say=lambda _: None)
    rows = [r for r in json.loads((family / "ws-out" / "results.json").read_text()) if r["arm"].startswith("strategy:")]
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted((f"strategy:{n}", s) for n in names for s in (0, 1))
    assert all(set(r) == ROW_KEYS | {"transferred", "old", "steps", "seconds", "labels", "used", "note"} for r in rows)
    by = {r["arm"].removeprefix("strategy:"): r for r in rows if r["seed"] == 0}
    assert by["retune"]["labels"] == 32 and by["retune"]["steps"] == 2  # every training row's label
    # The quick study's 4-step adapters never end an answer, so there is nothing to distil (tests/test_strategies.py
    # distils a real one): the row says so, and that it used no label.
    assert by["distill"]["labels"] == 0 and by["distill"]["used"]["prompts"] == 4
    assert by["distill"]["note"] == "the teacher ended no answer" and by["distill"]["steps"] == 0
    assert by["distill-synthetic"]["labels"] == 0 and "prompts" not in by["distill-synthetic"]["used"]
    assert 0 < by["scaled"]["labels"] < 8 and by["scaled"]["steps"] == 0  # the held-out eval rows only
    carried = summary["strategies"]
    assert list(carried["table"]["v1->v2"]["reverse"]) == list(names) and set(carried["gate"]) == {"v1->v2"}
    assert {"distill_minus_retune", "distill_seconds_over_retune"} <= set(carried["goals"]["v1->v2"])
    assert "## Carrying the chosen adapters over" in report(summary)

    said = []  # the phase alone, on the study just run: its jobs are found done, its rows are the same
    again = run_strategies(quick, _inputs(family, "ws"), family / "ws-out", say=said.append)
    assert any("already done" in line for line in said) and not any("] carry by" in line for line in said)
    assert again["strategies"]["table"] == carried["table"]


def test_two_worker_processes_give_the_rows_one_process_gives(family):
    quick = config(tasks=("reverse",), updates=("v1->v2",)).quick()
    one = run_study(replace(quick, workers=1), _inputs(family, "w1"), family / "one", say=lambda _: None)
    two = run_study(replace(quick, workers=2), _inputs(family, "w2"), family / "two", say=lambda _: None)
    assert one["table"] == two["table"]


def test_a_version_without_a_base_directory_is_refused(family):
    inputs = replace(_inputs(family), bases={"v1": str(family / "bases" / "v1")})
    with pytest.raises(ValueError, match="no model directory: v2"):
        run_study(config(updates=("v1->v2",)).quick(), inputs, family / "never")


def test_pooled_gap_closed_weighs_tasks_by_their_gap():
    from transpeft.study_results import pooled_gap_closed

    rows = KNOWN + _rows({("v1->v2", "sort", "direct", 0.0): [0.99, 0.99], ("v1->v2", "sort", "transpeft", 0.1): [0.9, 0.9],
                          ("v1->v2", "sort", "ft_new", 0.0): [1.0, 1.0]})
    # reverse gains 0.32 of a 1.1 gap; sort loses 0.18 of a 0.02 gap: the mean of shares would be -4.1
    assert pooled_gap_closed(_index(rows), "v1->v2", ["reverse", "sort"], "qkvo", 0.1, 0.0) == pytest.approx(
        (0.40 + 0.24 - 0.18) / (0.5 + 0.6 + 0.02), abs=1e-4)


def test_defaults_of_params_library_and_cli_are_the_committed_studys_choice():
    """params.yaml, TrainConfig/Gate defaults and the default LoRA targets all come from study/summary.json."""
    from pathlib import Path

    import yaml

    from transpeft import defaults
    from transpeft.methods import attention_projections
    from transpeft.params import Gate, load_params
    from transpeft.train import TrainConfig
    from conftest import tiny_model

    root = Path(__file__).resolve().parents[1]
    chosen = json.loads((root / "study/summary.json").read_text())["defaults"]
    assert (defaults.P_C, defaults.P_I, defaults.RETUNE_STEPS) == (chosen["p_c"], chosen["p_i"], chosen["retune_steps"])
    assert (TrainConfig().p_c, TrainConfig().p_i) == (chosen["p_c"], chosen["p_i"])
    gate = Gate(min_retention=0.8, min_score=0.5, beat_zero_shot=True, strategies=("direct", "retune"))
    assert (gate.retune_steps, gate.retune_p_c, gate.retune_p_i) == (chosen["retune_steps"], chosen["p_c"], chosen["p_i"])

    params = load_params(root / "params.yaml")
    assert params.gate.retune_steps == chosen["retune_steps"]
    assert (params.gate.retune_p_c, params.gate.retune_p_i) == (chosen["p_c"], chosen["p_i"])
    run = params.train.runs["transpeft-v1"]
    assert (run.p_c, run.p_i) == (chosen["p_c"], chosen["p_i"])
    chosen_targets = params.study.targets[chosen["target_modules"]]
    assert params.train.method.target_modules is None  # None: the attention projections...
    assert attention_projections(tiny_model("llama")) == sorted(chosen_targets)  # ...which are the chosen ones
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["method"]["target_modules"] is None


def test_readme_tables_are_the_committed_studys_numbers():
    from pathlib import Path

    from transpeft.study_results import grid_table, strategies_goals, strategies_table

    root = Path(__file__).resolve().parents[1]
    summary = json.loads((root / "study/summary.json").read_text())
    readme = (root / "README.md").read_text()
    assert main_table(summary) in readme
    assert grid_table(summary) in readme
    assert strategies_table(summary) in readme and strategies_goals(summary) in readme
    rows = json.loads((root / "study/results.json").read_text())
    assert len({r["seed"] for r in rows}) >= 3 and len({r["update"] for r in rows}) >= 2
    assert all(set(r) == ROW_KEYS for r in rows if not r["arm"].startswith("strategy:"))
