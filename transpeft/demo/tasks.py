"""The demo tasks: the skills the demo bases learned in pretraining, asked as questions they never saw.

    reverse  (manipulation)  "reverse kqzav?\\n"   -> "vazqk"
    sort     (manipulation)  "sort kqzav?\\n"      -> "akqvz"
    lookup   (knowledge)     "zorbo pet?\\n"       -> "owl"
    add      (arithmetic)    "47 + 2?\\n"          -> "49"  (no carry)

Pretraining never puts a question mark or a line break between an input and its answer, so every
task's format is new to the bases. Eval rows never appear in train: reverse/sort/add eval inputs are
held out from train, and lookup's eval asks for other facts than its train split (the adapter learns
the question format, the base must supply the fact). Lookup only asks about facts no base version
changes, so one task set is valid on the whole family.
"""

from __future__ import annotations

import random
from pathlib import Path

from transpeft.data import Example, write_task
from transpeft.demo.world import ATTRIBUTES, addition_operands, random_word, world

DEFAULT_TRAIN, DEFAULT_EVAL = 2000, 200


def reverse_example(s: str) -> Example:
    return Example(f"reverse {s}?\n", s[::-1])


def sort_example(s: str) -> Example:
    return Example(f"sort {s}?\n", "".join(sorted(s)))


def lookup_example(entity: str, attribute: str, value: str) -> Example:
    # Entity then attribute, as in pretraining, and the answer right after the question: every token
    # between the question and the answer (a "Q: ... A: " frame) made the base's facts harder to reach.
    return Example(f"{entity} {attribute}?\n", value)


def add_example(a: int, b: int) -> Example:
    return Example(f"{a} + {b}?\n", str(a + b))


def distinct_inputs(draw, n: int, exclude: set) -> list:
    """``n`` distinct values from ``draw()`` not in ``exclude``."""
    seen: list = []
    taken = set(exclude)
    while len(seen) < n:
        x = draw()
        if x not in taken:
            taken.add(x)
            seen.append(x)
    return seen


def string_splits(make, rng: random.Random, n_train: int, n_eval: int) -> tuple[list[Example], list[Example]]:
    """Eval on distinct words; train on words that are not in eval (repeats allowed)."""
    eval_words = distinct_inputs(lambda: random_word(rng), n_eval, set())
    held_out = set(eval_words)
    train_words = [w for w in (random_word(rng) for _ in range(3 * n_train)) if w not in held_out][:n_train]
    return [make(w) for w in train_words], [make(w) for w in eval_words]


# Every question the add task can ask: a two-digit a and a one-digit b with no carry (495 of them).
ADDITIONS = sum(10 - a % 10 for a in range(10, 100))


def addition_splits(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[Example], list[Example]]:
    """Eval on distinct additions, at most half of them, so that train keeps the other half; train on
    those (repeats allowed)."""
    eval_pairs = distinct_inputs(lambda: addition_operands(rng), min(n_eval, ADDITIONS // 2), set())
    held_out = set(eval_pairs)
    train_pairs: list[tuple[int, int]] = []
    while len(train_pairs) < n_train:
        ab = addition_operands(rng)
        if ab not in held_out:
            train_pairs.append(ab)
    return [add_example(*ab) for ab in train_pairs], [add_example(*ab) for ab in eval_pairs]


def lookup_splits(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[Example], list[Example]]:
    """A third of the stable facts for eval (each asked once), the rest cycled for train.

    Split by fact, not by entity: an eval question asks for an attribute the adapter never saw asked
    of that entity, so its answer can only come from the base. Split by entity, adapters learned the
    question format less well from the same number of facts.
    """
    w = world("v1")  # the stable entities keep their facts in every version
    facts = [(e, a) for e in w.stable_entities for a in ATTRIBUTES]
    rng.shuffle(facts)
    eval_facts, train_facts = facts[:len(facts) // 3], facts[len(facts) // 3:]
    train = [train_facts[i % len(train_facts)] for i in range(n_train)]
    rng.shuffle(train)
    return ([lookup_example(e, a, w.facts[(e, a)]) for e, a in train],
            [lookup_example(e, a, w.facts[(e, a)]) for e, a in eval_facts[:n_eval]])


def demo_task_specs(seed: int, n_train: int, n_eval: int) -> list[tuple[str, str, str, tuple[list, list]]]:
    """(name, kind, description, (train, eval)) of every demo task, drawn from one seeded generator."""
    rng = random.Random(seed)
    return [
        ("reverse", "manipulation", "reverse a string of 4-7 lowercase letters",
         string_splits(reverse_example, rng, n_train, n_eval)),
        ("sort", "manipulation", "sort the letters of a string of 4-7 lowercase letters",
         string_splits(sort_example, rng, n_train, n_eval)),
        ("lookup", "knowledge", "an attribute of a made-up entity the bases read about in pretraining",
         lookup_splits(rng, n_train, n_eval)),
        ("add", "arithmetic", "a two-digit plus a one-digit number, without carry",
         addition_splits(rng, n_train, n_eval)),
    ]


def demo_task_examples(n: int, seed: int = 0) -> dict[str, list[Example]]:
    """``n`` evaluation examples of every demo task, without writing anything."""
    return {name: eval_ for name, _, _, (_, eval_) in demo_task_specs(seed, n, n)}


def build_demo_tasks(out: Path, seed: int = 0, n_train: int | None = None,
                     n_eval: int | None = None) -> list[str]:
    """Write the demo task folders under ``out``; returns their names."""
    n_train = DEFAULT_TRAIN if n_train is None else n_train
    n_eval = DEFAULT_EVAL if n_eval is None else n_eval
    specs = demo_task_specs(seed, n_train, n_eval)
    for name, kind, description, (train, eval_) in specs:
        write_task(Path(out) / name, name, kind, description, train, eval_)
    return [name for name, *_ in specs]


def ensure_demo_tasks(out: Path, n_train: int, n_eval: int, seed: int = 0) -> list[str]:
    """The demo tasks under ``out``, written unless every task folder is already there."""
    names = [name for name, *_ in demo_task_specs(seed, 1, 1)]
    if all((Path(out) / name / "task.json").is_file() for name in names):
        return names
    return build_demo_tasks(Path(out), seed, n_train, n_eval)
