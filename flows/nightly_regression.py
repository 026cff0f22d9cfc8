"""nightly-regression: catch what was missed, then check every served adapter still scores.

    prefect deployment run 'nightly-regression/served-adapters'

Scheduled by prefect.yaml at params.yaml's ``nightly.cron`` (02:00 UTC by default). First the
reconciler: any base version whose revalidation never finished (its event was lost, or an adapter
crashed) is revalidated now. Then every served adapter is re-evaluated on its base and compared
with the baseline recorded in the registry; the run is logged to MLflow (experiment `nightly`)
and ends Failed, listing the regressions, when there are any.
"""

from __future__ import annotations

from prefect import State, flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.runtime import deployment

from flows import PARAMS, failure, fanout_runner, registry_uri
from flows.transfer_on_base_update import transfer_on_base_update
from tasks.nightly import find_served, find_unrevalidated, record_results, score_served
from transpeft.events import TRANSFER_DEPLOYMENT
from transpeft.nightly import Check
from transpeft.params import load_params


class Regressions(RuntimeError):
    """Served adapters that score below their registry baseline."""


def revalidate_missed(family: str, version: str, data_dir: str, params_file: str) -> State:
    """The reconciler's revalidation of one base. From a deployed nightly run it goes through the
    transfer deployment, so that deployment's concurrency limit keeps it from running beside an
    event-triggered revalidation of the same base; a nightly run called directly runs it as a subflow."""
    if deployment.id is None:
        return transfer_on_base_update(family, version, data_dir, params_file, return_state=True)
    run = run_deployment(TRANSFER_DEPLOYMENT, timeout=None, parameters={
        "family": family, "version": version, "data_dir": data_dir, "params_file": params_file})
    return run.state


@flow(name="nightly-regression", task_runner=fanout_runner(), log_prints=True)
def nightly_regression(family: str | None = None, data_dir: str = "pipeline/data", params_file: str = PARAMS) -> dict:
    """Reconcile missed revalidations, then re-evaluate every served adapter (of ``family``, or all)."""
    logger = get_run_logger()
    params = load_params(params_file)
    uri, tolerance = registry_uri(params_file), params.nightly.tolerance

    reconciled = []
    for base in find_unrevalidated(uri, family):
        logger.info("reconciler: %s/%s has no finished revalidation; running it", base.family, base.version)
        state = revalidate_missed(base.family, base.version, data_dir, params_file)
        reconciled.append(f"{base.family}/{base.version}: {state.name}")

    checks = [(base, records, score_served.submit(uri, base, records, data_dir, tolerance, params.placement))
              for base, records in find_served(uri, family)]
    results = []
    for base, records, future in checks:  # a base that cannot be scored fails each of its adapters
        error = failure(future)
        results += future.result() if error is None else [Check.unscorable(base, r, error) for r in records]
    run_id = record_results(uri, results, tolerance)
    failing = [c.line() for c in results if c.regressions]
    print(f"{len(results)} served adapters checked, {len(failing)} regressed; reconciled {reconciled or 'nothing'}; "
          f"MLflow run {run_id}")
    if failing:
        raise Regressions(f"{len(failing)} served adapters regressed:\n  " + "\n  ".join(failing))
    return {"checked": len(results), "regressions": 0, "reconciled": reconciled, "run_id": run_id}


if __name__ == "__main__":
    nightly_regression()
