"""prepare-data: the task datasets, validated and versioned with DVC, pushed to the DVC remote.

    prefect deployment run 'prepare-data/dvc'

Runs the `prepare` stage of dvc.yaml (one instance per task of params.yaml's ``prepare.tasks``),
pushes its outputs to the default DVC remote (.dvc/config) and returns each task's DVC hash, the
hash every adapter trained on that data is tagged with in MLflow.
"""

from __future__ import annotations

from prefect import flow

from flows import PARAMS
from tasks.data import dataset_hashes, push, reproduce
from transpeft.params import load_params


@flow(name="prepare-data", log_prints=True)
def prepare_data(params_file: str = PARAMS) -> dict[str, str | None]:
    """dvc repro prepare, dvc push; the dataset hashes per task."""
    print(reproduce("prepare").strip().splitlines()[-1:] or "")
    push("prepare")
    hashes = dataset_hashes(list(load_params(params_file).prepare.tasks))
    for task, digest in hashes.items():
        print(f"{task}: {digest}")
    return hashes
