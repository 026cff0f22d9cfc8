"""Tasks of prepare-data: DVC does the work (the `prepare` stage of dvc.yaml, then a push)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from transpeft.params import DATA
from transpeft.versioning import dvc_hash


def _dvc(*args: str) -> str:
    # The stage commands call `python`: the flow's own interpreter must come first on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({done.returncode}):\n{done.stderr.strip()[-3000:]}")
    return done.stdout


@task(cache_policy=NO_CACHE)
def reproduce(stage: str = "prepare") -> str:
    """`dvc repro <stage>`: rebuilds only what changed since dvc.lock."""
    return _dvc("repro", stage)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])  # a push is I/O only: any failure is
def push(stage: str = "prepare") -> str:                                 # the remote's, worth a second try
    """`dvc push` of the stage's outputs to the default remote."""
    return _dvc("push", stage)


@task(cache_policy=NO_CACHE)
def dataset_hashes(tasks: list[str]) -> dict[str, str | None]:
    """Each task's DVC content hash, as dvc.lock records it."""
    return {name: dvc_hash(DATA / name) for name in tasks}
