"""Stage prepare: the demo tasks and every task folder under datasets/, validated, into pipeline/data.

A bad row anywhere fails the stage with its file and line, and pipeline/data keeps its previous
version: the new data is assembled and validated in a staging folder that replaces the old one only
when complete.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from ..data import DataError, load_task, load_tasks
from ..demo.tasks import build_demo_tasks
from ..params import load_params
from . import DATA, USER_DATASETS


def user_task_folders(root: Path = USER_DATASETS) -> list[Path]:
    return sorted(p for p in root.glob("*") if p.is_dir() and (p / "train.jsonl").exists()) if root.is_dir() else []


def prepare(out: Path = DATA) -> list[str]:
    params = load_params().prepare
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".data.", dir=out.parent))
    try:
        demo = build_demo_tasks(staging, seed=params.seed, n_train=params.n_train, n_eval=params.n_eval)
        for name in set(demo) - set(params.demo_tasks):
            shutil.rmtree(staging / name)
        for folder in user_task_folders():
            task = load_task(folder)  # validates every row, naming file and line
            if (staging / task.name).exists():
                raise DataError(f"{folder}: task name {task.name!r} is also a demo task; rename the folder")
            shutil.copytree(folder, staging / folder.name)
        names = [t.name for t in load_tasks(staging)]
        if out.exists():
            retired = out.with_name(f".{out.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            out.rename(retired)
            staging.rename(out)
            shutil.rmtree(retired)
        else:
            staging.rename(out)
        return names
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main() -> int:
    try:
        names = prepare()
    except DataError as e:
        print(f"prepare failed, {DATA} is unchanged: {e}", file=sys.stderr)
        return 1
    print(f"prepared {len(names)} tasks in {DATA}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
