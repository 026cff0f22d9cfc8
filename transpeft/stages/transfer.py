"""Stage transfer: every adapter of pipeline/adapters on its own base and every later base version.

Each base is loaded once for all the adapters it scores (hot swap). Writes one metrics file per
adapter, pipeline/metrics/<run>/<task>.json = {base version: exact match}, so that
`dvc metrics show` prints the transfer table: one row per adapter, one column per base version.
"""

from __future__ import annotations

import json
import shutil
import sys

from ..adapters import read_manifest
from ..bases import load_base
from ..data import load_task
from ..params import load_params
from ..transfer import evaluate_adapters
from . import ADAPTERS, DATA, METRICS


def main() -> int:
    params = load_params()
    versions = params.bases.versions
    adapters = sorted(p for p in ADAPTERS.glob("*/*") if p.is_dir())
    trained_on = {a: read_manifest(a).base.version for a in adapters}
    scores: dict = {a: {} for a in adapters}
    for version in versions:
        eligible = [a for a in adapters if versions.index(trained_on[a]) <= versions.index(version)]
        if not eligible:
            continue
        model, tokenizer, base = load_base(params.bases.ref(version), params.placement)
        tasks = [load_task(DATA / name) for name in sorted({a.name for a in eligible})]
        results = evaluate_adapters(model, tokenizer, base, eligible, tasks,
                                    batch_size=params.transfer.get("batch_size", 32), progress=True)
        for adapter in eligible:
            scores[adapter][version] = round(results[str(adapter)][adapter.name]["exact_match"], 4)
    shutil.rmtree(METRICS, ignore_errors=True)
    for adapter, row in scores.items():
        path = METRICS / adapter.parent.name / f"{adapter.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"trained_on": trained_on[adapter], **row}, indent=2) + "\n")
    print(f"scored {len(adapters)} adapters on {', '.join(versions)} -> {METRICS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
