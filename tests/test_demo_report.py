"""The demo report's strategies section (transpeft/demo/report.py): per adapter, what each of the gate's
strategies scored, which one carried it and whether it needed labels, read from the registry version's
tags and its revalidation run's metrics as record_outcome writes them. The story test runs it on a
real revalidation; these cases cover what one small fleet may not hit."""

from __future__ import annotations

from transpeft.demo.report import carried_over, render
from transpeft.tracking import AdapterRecord

ORDER = ["direct", "scaled", "distill", "retune"]


def _record(name: str, status: str, score: float) -> AdapterRecord:
    return AdapterRecord(name, "demo", "v3", status, "v2", {"add": score}, "3", status != "failed-gate")


def test_each_strategy_tried_shows_its_score_and_the_rest_are_not_tried():
    metrics = {"exact_match.add": 0.0, "seconds.evaluate": 1.0, "scaled_exact_match.add": 0.02, "seconds.scaled": 0.5,
               "distill_exact_match.add": 0.9, "seconds.distill": 20.0, "steps.distill": 100}
    row = carried_over(_record("add-plain-v1", "distilled", 0.9),
                       {"strategy": "distill", "labels": "false", "used": "256 prompts"}, metrics, ORDER)
    assert row["tried"] == {"direct": 0.0, "scaled": 0.02, "distill": 0.9, "retune": "not tried"}
    assert (row["carried by"], row["labels"], row["used"]) == ("distill", "no", "256 prompts")


def test_a_strategy_that_made_no_candidate_is_not_applicable_and_a_flagged_adapter_names_none():
    metrics = {"exact_match.add": 0.1, "seconds.scaled": 0.4, "scaled_exact_match.add": 0.1,
               "seconds.distill": 0.0, "seconds.retune": 9.0, "retune_exact_match.add": 0.3, "steps.retune": 100}
    row = carried_over(_record("add-transpeft-v1", "failed-gate", 0.1), {"strategy": "none"}, metrics, ORDER)
    assert row["tried"] == {"direct": 0.1, "scaled": 0.1, "distill": None, "retune": 0.3}
    assert (row["carried by"], row["labels"]) == ("none (flagged)", "-")


def test_the_report_puts_one_column_per_strategy_and_marks_the_one_that_carried(tmp_path):
    rows = [carried_over(_record("add-plain-v1", "retuned", 0.92), {"strategy": "retune", "labels": "true",
                                                                     "used": "2000 labels"},
                         {"exact_match.add": 0.0, "seconds.scaled": 0.5, "scaled_exact_match.add": 0.01,
                          "seconds.distill": 9.0, "distill_exact_match.add": 0.4,
                          "seconds.retune": 9.0, "retune_exact_match.add": 0.92}, ORDER),
            carried_over(_record("add-transpeft-v1", "transferred", 0.85), {"strategy": "direct", "labels": "false",
                                                                            "used": "nothing"},
                         {"exact_match.add": 0.85}, ORDER)]
    data = {"versions": ["v1", "v2", "v3"], "arms": {}, "decisions": [], "drift": {}, "similarity": {}, "compute": [],
            "strategies": ORDER, "carried": {"v3": rows}}
    markdown, page = render(data, tmp_path)
    section = markdown.read_text().split("## v1 -> v3: how each adapter was carried over")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert table[0] == "| adapter | from | direct | scaled | distill | retune | carried by | labels needed | used |"
    assert table[2:] == ["| add-plain-v1 | v2 | 0.0 ✗ | 1.0 ✗ | 40.0 ✗ | 92.0 ✓ | retune | yes | 2000 labels |",
                         "| add-transpeft-v1 | v2 | 85.0 ✓ | not tried | not tried | not tried | direct | no | nothing |"]
    assert "92.0 ✓" in page.read_text(encoding="utf-8")
