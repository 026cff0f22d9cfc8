"""The demo tasks: the skills the demo bases learned in pretraining, asked in a Q/A format they never saw.

    reverse  (manipulation)  "Q: reverse kqzav\\nA: "        -> "vazqk"
    sort     (manipulation)  "Q: sort kqzav\\nA: "           -> "akqvz"
    lookup   (knowledge)     "Q: zorbo pet?\\nA: "            -> "owl"
    add      (arithmetic)    "Q: what is 47 + 2?\\nA: "      -> "49"  (no carry)

Eval rows never appear in train: reverse/sort/add eval inputs are held out from train, and lookup's
eval asks about other entities than its train split (the adapter must learn the format, the base
must supply the fact). Lookup only asks about entities whose facts no base version changes, so one
task set is valid on the whole family.
"""

from __future__ import annotations

import random
from pathlib import Path

from transpeft.data import Example, write_task
from transpeft.demo.world import ATTRIBUTES, addition_operands, random_word, world

DEFAULT_TRAIN, DEFAULT_EVAL = 2000, 200


def reverse_example(s: str) -> Example:
    return Example(f"Q: reverse {s}\nA: ", s[::-1])


def sort_example(s: str) -> Example:
    return Example(f"Q: sort {s}\nA: ", "".join(sorted(s)))


def lookup_example(entity: str, attribute: str, value: str) -> Example:
    # Entity then attribute, as in every pretraining format, and few tokens before the answer.
    return Example(f"Q: {entity} {attribute}?\nA: ", value)


def add_example(a: int, b: int) -> Example:
    return Example(f"Q: what is {a} + {b}?\nA: ", str(a + b))


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


def addition_splits(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[Example], list[Example]]:
    eval_pairs = distinct_inputs(lambda: addition_operands(rng), n_eval, set())
    held_out = set(eval_pairs)
    pairs = [ab for ab in (addition_operands(rng) for _ in range(3 * n_train)) if ab not in held_out]
    return [add_example(*ab) for ab in pairs[:n_train]], [add_example(*ab) for ab in eval_pairs]


def lookup_splits(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[Example], list[Example]]:
    """Train cycles over the train entities' facts; eval asks each eval-entity fact at most once."""
    w = world("v1")  # eval and train entities keep their facts in every version
    eval_facts = [(e, a) for e in w.eval_entities for a in ATTRIBUTES]
    train_facts = [(e, a) for e in w.train_entities for a in ATTRIBUTES]
    rng.shuffle(eval_facts)
    train = [train_facts[i % len(train_facts)] for i in range(n_train)]
    rng.shuffle(train)
    return ([lookup_example(e, a, w.facts[(e, a)]) for e, a in train],
            [lookup_example(e, a, w.facts[(e, a)]) for e, a in eval_facts[:n_eval]])


def build_demo_tasks(out: Path, seed: int = 0, n_train: int | None = None,
                     n_eval: int | None = None) -> list[str]:
    """Write the demo task folders under ``out``; returns their names."""
    n_train = DEFAULT_TRAIN if n_train is None else n_train
    n_eval = DEFAULT_EVAL if n_eval is None else n_eval
    rng = random.Random(seed)
    specs = [
        ("reverse", "manipulation", "reverse a string of 4-7 lowercase letters",
         string_splits(reverse_example, rng, n_train, n_eval)),
        ("sort", "manipulation", "sort the letters of a string of 4-7 lowercase letters",
         string_splits(sort_example, rng, n_train, n_eval)),
        ("lookup", "knowledge", "one attribute of a made-up entity the bases read about in pretraining",
         lookup_splits(rng, n_train, n_eval)),
        ("add", "arithmetic", "a two-digit plus a one-digit number, without carry",
         addition_splits(rng, n_train, n_eval)),
    ]
    for name, kind, description, (train, eval_) in specs:
        write_task(Path(out) / name, name, kind, description, train, eval_)
    return [name for name, *_ in specs]
