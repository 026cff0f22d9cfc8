"""Stage prepare, one instance per task: its source validated into pipeline/data/<task>.

    python -m transpeft.stages.prepare --task reverse

A task's source (``prepare.tasks`` in params.yaml) is the demo generator (transpeft/demo/tasks.py)
or a folder of JSONL in the documented format. A bad row fails the stage with its file and line, and
pipeline/data/<task> keeps its previous version: the new data is assembled and validated in a
staging folder that replaces the old one only when complete.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from ..data import DataError, load_task
from ..demo import tasks as demo_tasks
from ..params import Prepare, load_params
from . import DATA

DEMO_SOURCE = Path(demo_tasks.__file__).relative_to(Path(demo_tasks.__file__).parents[2])


def stage_task(name: str, params: Prepare, staging: Path) -> Path:
    """The task folder, written under ``staging`` and validated."""
    source = Path(params.tasks[name])
    if source == DEMO_SOURCE:
        demo_tasks.build_demo_tasks(staging / "demo", seed=params.seed, n_train=params.n_train, n_eval=params.n_eval)
        if not (staging / "demo" / name).is_dir():
            raise DataError(f"params.yaml: prepare.tasks.{name}: the demo generator has no task {name!r}")
        folder = staging / "demo" / name
    elif source.is_dir():
        load_task(source)  # every row, or the first bad one named by the user's own file and line
        folder = shutil.copytree(source, staging / name)
    else:
        raise DataError(f"params.yaml: prepare.tasks.{name}: {source} is neither {DEMO_SOURCE} nor a task folder")
    load_task(folder)
    return folder


def prepare(name: str, out_root: Path = DATA) -> Path:
    params = load_params().prepare
    if name not in params.tasks:
        raise DataError(f"params.yaml: no task {name!r} under prepare.tasks")
    out = out_root / name
    out_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=out_root) as tmp:
        ready = stage_task(name, params, Path(tmp))
        if out.exists():
            shutil.rmtree(out)
        ready.rename(out)  # same filesystem: the swap is a rename
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help="a key of prepare.tasks in params.yaml")
    args = parser.parse_args(argv)
    try:
        out = prepare(args.task)
    except DataError as e:
        print(f"prepare failed, {DATA / args.task} is unchanged: {e}", file=sys.stderr)
        return 1
    task = load_task(out)
    print(f"prepared {task.name}: {len(task.train)} train, {len(task.eval)} eval rows in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
