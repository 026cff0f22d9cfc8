"""Tasks: JSONL rows of {"prompt", "answer"}, validated with the file and line of every bad row.

A task is a folder::

    my-task/
      task.json      optional: {"name": "my-task", "kind": "manipulation", "description": "..."}
      train.jsonl    one {"prompt": "...", "answer": "..."} object per line
      eval.jsonl     same format

The model sees ``prompt + answer + <eos>``; the loss and every metric cover the answer and the
end-of-answer token only. ``kind`` is one of KINDS and only labels reports.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

KINDS = ("manipulation", "knowledge", "arithmetic", "other")
SPLITS = ("train", "eval")


class DataError(ValueError):
    """A task folder or row that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    description: str
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    content_hash: str  # sha256 of task.json, train.jsonl and eval.jsonl bytes

    def duplicates(self, split: str = "train") -> int:
        """Rows of the split that repeat an earlier row exactly (they weigh more in training and scoring)."""
        rows = getattr(self, split)
        return len(rows) - len(set(rows))


def read_examples(path: Path) -> tuple[Example, ...]:
    """Parse one JSONL split, refusing the first bad row with its line number."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; a task folder needs train.jsonl and eval.jsonl")
    examples = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); save the "
                                "file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object with 'prompt' and 'answer'")
            for key in ("prompt", "answer"):
                if key not in row:
                    raise DataError(f"{where}: row has no '{key}'")
                if not isinstance(row[key], str):
                    raise DataError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
            if not row["answer"]:
                raise DataError(f"{where}: 'answer' is empty; every row needs an answer to learn and score")
            examples.append(Example(row["prompt"], row["answer"]))
    if not examples:
        raise DataError(f"{path}: no rows; a split needs at least one example")
    return tuple(examples)


def load_task(folder: str | Path) -> Task:
    """Load and validate one task folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: task folder not found")
    meta_path = folder / "task.json"
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    kind = meta.get("kind", "other")
    if kind not in KINDS:
        raise DataError(f"{meta_path}: kind {kind!r} is not one of {', '.join(KINDS)}")
    digest = hashlib.sha256()
    for name in ("task.json", "train.jsonl", "eval.jsonl"):
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return Task(
        name=meta.get("name", folder.name),
        kind=kind,
        description=meta.get("description", ""),
        train=read_examples(folder / "train.jsonl"),
        eval=read_examples(folder / "eval.jsonl"),
        content_hash=digest.hexdigest(),
    )


def load_tasks(root: str | Path, names: list[str] | None = None) -> list[Task]:
    """Load the named tasks (default: every task folder) under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; build one with `transpeft data build-demo --out {root}`")
    available = sorted(p.name for p in root.iterdir() if (p / "train.jsonl").exists())
    if names is None:
        names = available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DataError(f"unknown task {', '.join(unknown)} in {root}; available: {', '.join(available) or 'none'}")
    if not names:
        raise DataError(f"{root}: no task folders (a task folder holds train.jsonl and eval.jsonl)")
    return [load_task(root / n) for n in names]


def write_task(folder: Path, name: str, kind: str, description: str,
               train: list[Example], eval: list[Example]) -> None:
    """Write a task folder in the documented format."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "kind": kind, "description": description}
    (folder / "task.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    for split, rows in (("train", train), ("eval", eval)):
        with (folder / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for ex in rows:
                f.write(json.dumps({"prompt": ex.prompt, "answer": ex.answer}) + "\n")
