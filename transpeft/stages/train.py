"""Stage train: one adapter per (task, run) of the grid in params.yaml, into pipeline/adapters/<run>/<task>.

    python -m transpeft.stages.train --task reverse --run transpeft-v1

With ``tracking.uri`` (or MLFLOW_TRACKING_URI) set, the training run is logged to MLflow and tagged
with the DVC hash of the exact data it used.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..data import load_task
from ..params import load_params
from ..train import train_adapter
from ..versioning import dvc_hash
from . import ADAPTERS, DATA


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--run", required=True, help="a key of train.runs in params.yaml")
    args = parser.parse_args(argv)
    params = load_params()
    if args.run not in params.train.runs:
        print(f"params.yaml: no run {args.run!r} under train.runs", file=sys.stderr)
        return 1
    from ..bases import load_base

    run = params.train.runs[args.run]
    task = load_task(DATA / args.task)
    model, tokenizer, base = load_base(params.bases.ref(run.base), params.placement)
    out = ADAPTERS / args.run / args.task
    _, manifest, result = train_adapter(model, tokenizer, base, [task], params.train.method,
                                        params.train.config(args.run), out)
    print(f"{out}: {manifest.metrics[task.name]['exact_match']:.3f} exact match on {base.family}/{base.version}")

    uri = params.tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        from ..tracking import Registry

        data_hash = dvc_hash(DATA / args.task)
        Registry(uri).log_training(f"{args.task}-{args.run}", out, manifest,
                                   extra_tags={"dvc_data_hash": data_hash or "untracked", "dvc_data_path": str(DATA)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
