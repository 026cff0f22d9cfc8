"""Progress lines for logs: how many, when, and what they say (transpeft/progress.py)."""

from __future__ import annotations

import io
import re

from transpeft.progress import Lines


def lines_of(steps: int, every_s: float = 1e9, total: int | None = None, iterable=None) -> list[str]:
    out = io.StringIO()
    bar = Lines(iterable if iterable is not None else range(steps), "train", total=total, every_s=every_s, stream=out)
    with bar:
        for step in bar:
            bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
    return out.getvalue().splitlines()


def test_a_line_at_every_tenth_with_the_step_the_postfix_and_the_rate():
    lines = lines_of(1000)
    assert len(lines) == 10
    assert lines[0].startswith("train: step 100/1000 (10%), loss 0.010, ")
    assert lines[-1].startswith("train: step 1000/1000 (100%), loss 0.001, ")
    assert all(re.search(r", \d+\.\d step/s$", line) for line in lines)


def test_a_short_loop_gets_a_line_per_step_at_most():
    assert [line.split(",")[0] for line in lines_of(3)] == ["train: step 1/3 (33%)", "train: step 2/3 (66%)",
                                                          "train: step 3/3 (100%)"]


def test_a_slow_loop_gets_a_line_every_few_seconds_between_tenths():
    assert len(lines_of(1000, every_s=0.0)) == 1000  # every step is past the interval


def test_a_loop_of_unknown_length_says_where_it_ended():
    lines = lines_of(0, iterable=iter(range(7)))
    assert len(lines) == 1 and lines[0].startswith("train: step 7, loss 0.143")


def test_an_empty_loop_prints_nothing():
    assert lines_of(0) == []
