"""Dataset identity as DVC records it: the content hash of the DVC-tracked output holding a path."""

from __future__ import annotations

from pathlib import Path

import yaml


def dvc_hash(path: str | Path, repo: str | Path = ".") -> str | None:
    """``md5:<hash>`` of the dvc.lock output or ``.dvc``-tracked folder that contains ``path``, if any.

    The hash names the exact bytes in DVC's cache, so `dvc checkout`/`dvc pull` at the commit that
    recorded it brings the data back.
    """
    repo, target = Path(repo).resolve(), Path(path).resolve()
    candidates = []
    lock = repo / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        candidates += [out for stage in stages.values() for out in stage.get("outs", [])]
    for tracked in (target, *target.parents):  # `dvc add x` writes x.dvc beside x
        if not tracked.name:
            break
        dvc_file = tracked.with_name(tracked.name + ".dvc")
        if dvc_file.is_file():
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [])
            candidates += [{**out, "path": str(dvc_file.parent / out["path"])} for out in outs]
    for out in candidates:
        tracked = (repo / out["path"]).resolve()
        if (target == tracked or tracked in target.parents) and out.get("md5"):
            return f"md5:{out['md5']}"
    return None
