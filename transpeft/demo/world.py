"""The made-up world of the demo family: entities, their facts, and the text formats per base version.

The pretraining corpus (``transpeft.demo.family``) and the downstream tasks (``transpeft.demo.tasks``)
both draw from here, so the tasks ask about exactly what the bases learned, in a format they never saw.

Each base version has its own pretraining formats for the same four skills (reverse a string, sort its
letters, state a fact about an entity, add two numbers). A later version also changes the facts of
some "churn" entities and adds new entities; the facts the lookup task asks about never change, so
one task set is valid on every version.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

LETTERS = "abcdefghijklmnopqrstuvwxyz"
ATTRIBUTES = {
    "color": ("red", "blue", "green", "pink", "gray", "gold", "teal", "plum"),
    "city": ("varn", "oskel", "brim", "talo", "quen", "dusk", "mirra", "fenn"),
    "pet": ("cat", "dog", "owl", "fox", "yak", "eel", "bat", "ant"),
}
VERSIONS = ("v1", "v2", "v3")
WORLD_SEED = 1234  # the world is fixed; seeds elsewhere only vary sampling

# How many entities of each role. The lookup task asks about the stable ones: 120 entities x 3
# attributes, split by fact between its train and eval sets; fewer (96, with eval and train split by
# entity) left an adapter too few distinct questions to learn the question format from.
N_STABLE_ENTITIES = 120
N_CHURN_ENTITIES = 16
N_NEW_PER_UPDATE = 16


@dataclass(frozen=True)
class World:
    """The entities a base version knows and their facts: {(entity, attribute): value}."""

    version: str
    stable_entities: tuple[str, ...]  # their facts never change: the lookup task asks about them
    facts: dict[tuple[str, str], str]

    @property
    def entities(self) -> list[str]:
        return sorted({e for e, _ in self.facts})


def entity_names(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct pronounceable made-up names of two or three syllables."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.choice((2, 3))))
        if name not in names:
            names.append(name)
    return names


def random_facts(entities: list[str], rng: random.Random) -> dict[tuple[str, str], str]:
    return {(e, a): rng.choice(values) for e in entities for a, values in ATTRIBUTES.items()}


def world(version: str) -> World:
    """The world as base ``version`` saw it in pretraining (deterministic)."""
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; one of {', '.join(VERSIONS)}")
    rng = random.Random(WORLD_SEED)
    n_stable = N_STABLE_ENTITIES
    names = entity_names(n_stable + N_CHURN_ENTITIES + N_NEW_PER_UPDATE * (len(VERSIONS) - 1), rng)
    stable, churn = names[:n_stable], names[n_stable:n_stable + N_CHURN_ENTITIES]
    new = names[n_stable + N_CHURN_ENTITIES:]
    facts = random_facts(stable + churn, rng)
    for i in range(1, VERSIONS.index(version) + 1):
        # An update moves every churn entity to a different value and introduces new entities.
        for (e, a), old in list(facts.items()):
            if e in churn:
                facts[(e, a)] = rng.choice([v for v in ATTRIBUTES[a] if v != old])
        facts.update(random_facts(new[(i - 1) * N_NEW_PER_UPDATE:i * N_NEW_PER_UPDATE], rng))
    return World(version, tuple(stable), facts)


def random_word(rng: random.Random, lo: int = 4, hi: int = 7) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def addition_operands(rng: random.Random) -> tuple[int, int]:
    """A two-digit plus a one-digit number with no carry: a ~1 M-parameter model learns this in
    minutes, while with carries it stayed near 3 % after the whole v1 pretraining."""
    a = rng.randint(10, 99)
    return a, rng.randint(0, 9 - a % 10)


# Pretraining formats: (reverse, sort, fact, add). Every line states its input before its answer.
Formats = tuple[Callable[[str, str], str], Callable[[str, str], str],
                Callable[[str, str, str], str], Callable[[int, int, int], str]]
PRETRAIN_FORMATS: dict[str, Formats] = {
    "v1": (lambda s, r: f"{s} > {r}",
           lambda s, o: f"{s} ~ {o}",
           lambda e, a, v: f"{e} {a} {v}",
           lambda a, b, c: f"{a}+{b}={c}"),
    "v2": (lambda s, r: f"flip {s} is {r}",
           lambda s, o: f"order {s} is {o}",
           lambda e, a, v: f"{e}'s {a} is {v}",
           lambda a, b, c: f"{a} plus {b} is {c}"),
    "v3": (lambda s, r: f"{s} backwards: {r}",
           lambda s, o: f"{s} in order: {o}",
           lambda e, a, v: f"{e}: {a} = {v}",
           lambda a, b, c: f"sum {a} {b} -> {c}"),
}
SKILL_SHARES = (0.3, 0.2, 0.35, 0.15)  # reverse, sort, fact, add: what the tasks need, nothing else


def pretraining_line(w: World, fact_keys: list[tuple[str, str]], formats: Formats,
                     rng: random.Random) -> str:
    """One line of pretraining text, a skill drawn by SKILL_SHARES (``fact_keys``: list(w.facts))."""
    reverse, sort, fact, add = formats
    skill = rng.choices(range(4), weights=SKILL_SHARES)[0]
    if skill == 0:
        s = random_word(rng)
        return reverse(s, s[::-1])
    if skill == 1:
        s = random_word(rng)
        return sort(s, "".join(sorted(s)))
    if skill == 2:
        e, a = rng.choice(fact_keys)
        return fact(e, a, w.facts[(e, a)])
    a, b = addition_operands(rng)
    return add(a, b, a + b)
