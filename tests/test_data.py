"""The task format: every bad row is refused with its file and line."""

from __future__ import annotations

import json

import pytest

from transpeft.data import DataError, Example, load_task, load_tasks, write_task


def make_task(root, name="reverse", train_lines=None, eval_lines=None):
    folder = root / name
    write_task(folder, name, "manipulation", "", [Example("rev ab", "ba")], [Example("rev cd", "dc")])
    if train_lines is not None:
        (folder / "train.jsonl").write_text("\n".join(train_lines) + "\n")
    if eval_lines is not None:
        (folder / "eval.jsonl").write_text("\n".join(eval_lines) + "\n")
    return folder


def test_a_written_task_loads_back_with_a_content_hash(tmp_path):
    task = load_task(make_task(tmp_path))
    assert task.train == (Example("rev ab", "ba"),) and task.kind == "manipulation"
    assert len(task.content_hash) == 64
    (tmp_path / "reverse" / "eval.jsonl").write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    assert load_task(tmp_path / "reverse").content_hash != task.content_hash


GOOD = json.dumps({"prompt": "rev ab", "answer": "ba"})


@pytest.mark.parametrize("bad_line,match", [
    ("{not json", "train.jsonl:2: not valid JSON"),
    ('["a", "b"]', "train.jsonl:2: expected an object"),
    ('{"prompt": "rev ab"}', "train.jsonl:2: row has no 'answer'"),
    ('{"answer": "ba"}', "train.jsonl:2: row has no 'prompt'"),
    ('{"prompt": "rev ab", "answer": ""}', "train.jsonl:2: 'answer' is empty"),
    ('{"prompt": "rev ab", "answer": 12}', "train.jsonl:2: 'answer' must be a string"),
])
def test_bad_rows_are_refused_with_file_and_line(tmp_path, bad_line, match):
    folder = make_task(tmp_path, train_lines=[GOOD, bad_line, GOOD])
    with pytest.raises(DataError, match=match):
        load_task(folder)


def test_an_empty_split_is_refused(tmp_path):
    folder = make_task(tmp_path, eval_lines=[""])
    with pytest.raises(DataError, match="eval.jsonl: no rows"):
        load_task(folder)


def test_a_missing_split_is_refused(tmp_path):
    folder = make_task(tmp_path)
    (folder / "eval.jsonl").unlink()
    with pytest.raises(DataError, match="eval.jsonl: file not found"):
        load_task(folder)


def test_an_unknown_task_names_the_available_ones(tmp_path):
    make_task(tmp_path, "reverse")
    make_task(tmp_path, "sort")
    with pytest.raises(DataError, match="unknown task addition .* available: reverse, sort"):
        load_tasks(tmp_path, ["reverse", "addition"])


def test_an_unknown_kind_is_refused(tmp_path):
    folder = make_task(tmp_path)
    (folder / "task.json").write_text(json.dumps({"kind": "poetry"}))
    with pytest.raises(DataError, match="kind 'poetry' is not one of"):
        load_task(folder)
