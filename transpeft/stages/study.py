"""Stage study: the transfer study (transpeft.study) on pipeline/bases and pipeline/data, into study/.

    python -m transpeft.stages.study          # what `dvc repro study` runs; about 40 min on 2 CPU cores

Writes study/results.json (every raw row), study/summary.json (the metrics `dvc metrics show` prints),
study/report.md and the plots `dvc plots show` draws. Finished jobs are kept under pipeline/study, so
an interrupted run resumes. With tracking.uri (or MLFLOW_TRACKING_URI) set, the study is logged to MLflow.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..params import load_params
from . import DATA, PIPELINE

STUDY = Path("study")


def main() -> int:
    from ..study import Inputs, run_study

    params = load_params()
    if params.study is None:
        print("params.yaml has no study key: nothing to run", file=sys.stderr)
        return 1
    sources = {v: params.bases.ref(v).source for v in params.bases.versions}
    not_local = [f"{v} ({s})" for v, s in sources.items() if not Path(s).is_dir()]
    if not_local:
        print(f"the study loads bases from local directories; not found: {', '.join(not_local)}", file=sys.stderr)
        return 1
    inputs = Inputs(bases=sources, family=params.bases.family, data=str(DATA), workdir=str(PIPELINE / "study"),
                    placement=params.placement)
    summary = run_study(params.study, inputs, STUDY)
    uri = params.tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        from ..tracking import log_study

        print(f"logged to MLflow: run {log_study(uri, summary, STUDY)} in experiment study")
    return 0


if __name__ == "__main__":
    sys.exit(main())
