"""finetune-adapters: the fleet's adapters, trained with Trans-PEFT on their base and registered.

    prefect deployment run 'finetune-adapters/grid' -p version=v1

One adapter per task x run of params.yaml (``train.tasks``, ``train.runs``) whose run trains on
base ``version`` (every run when unset), named ``<task>-<run>`` in the registry. The base must be
registered. Adapters already registered on their base are not trained again.
"""

from __future__ import annotations

from prefect import flow

from flows import PARAMS, failure, fanout_runner, registry_uri
from tasks.train import finetune_adapter
from transpeft.params import load_params


@flow(name="finetune-adapters", task_runner=fanout_runner(), log_prints=True)
def finetune_adapters(version: str | None = None, runs: list[str] | None = None, data_dir: str = "pipeline/data",
                      params_file: str = PARAMS) -> list[dict]:
    """Train and register every (task, run) of the grid on base ``version``."""
    params, uri = load_params(params_file), registry_uri(params_file)
    unknown = sorted(set(runs or []) - set(params.train.runs))
    if unknown:
        raise ValueError(f"runs {unknown} are not in params.yaml train.runs ({', '.join(params.train.runs)})")
    chosen = [r for r, spec in params.train.runs.items()
              if (runs is None or r in runs) and (version is None or spec.base == version)]
    futures = [finetune_adapter.submit(uri, task, run, data_dir, params_file)
               for run in chosen for task in params.train.tasks]
    results, failed = [], []
    for future in futures:
        error = failure(future)
        if error:  # the others still finish and register
            failed.append(error)
            continue
        results.append(future.result())
        print(results[-1].line())
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(futures)} adapters failed to train:\n  " + "\n  ".join(failed))
    return [r.as_dict() for r in results]
