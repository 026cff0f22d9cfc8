"""transfer-on-base-update: a new base version arrived; carry every adapter of its family over.

    prefect deployment run 'transfer-on-base-update/all-adapters' -p family=demo -p version=v2

Started by itself when a base version is registered (the `transpeft.base.registered` event, see
prefect.yaml). For each adapter served on an earlier version of the family: fetch its files from
MLflow, put it on the new base (loaded once per concurrent slot, not per adapter), evaluate, gate,
then register it on the new base, re-tune it or flag it (params.yaml `gate`). Adapters run
concurrently and independently: one failing never stops the others. Running it again for the same
base registers nothing twice: adapters already on the new base are left as they are.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows import PARAMS, failure, fanout_runner, registry_uri
from tasks.revalidate import close_run, fetch_adapter, judge_adapter, open_run, plan_revalidation, record
from transpeft.params import load_params
from transpeft.revalidate import Outcome, workdir

MAX_RUNS = 3  # a run that crashed is run again, up to this many runs in all


@flow(name="transfer-on-base-update", task_runner=fanout_runner(), log_prints=True)
def transfer_on_base_update(family: str, version: str, data_dir: str = "pipeline/data",
                            params_file: str = PARAMS) -> dict:
    """Transfer, judge and re-register every adapter of ``family`` on base ``version``."""
    logger = get_run_logger()
    if flow_run.run_count > MAX_RUNS:  # flows/automations.yaml schedules a crashed run again
        raise RuntimeError(f"{family}/{version}: this revalidation crashed {flow_run.run_count - 1} times; not run "
                           "again. Find the cause in its logs; the nightly reconciler runs it once it is fixed")
    params = load_params(params_file)
    uri, gate = registry_uri(params_file), params.gate
    revalidation = plan_revalidation(uri, family, version)
    logger.info("%s/%s: %d adapters to carry over, %d already there", family, version,
                len(revalidation.candidates), len(revalidation.done))
    parent_run = open_run(uri, revalidation)

    with workdir(family, version) as scratch:
        chains = []
        for candidate in revalidation.candidates:
            files = fetch_adapter.submit(uri, candidate, scratch)
            outcome = judge_adapter.submit(files, candidate, revalidation.target, data_dir, gate, scratch,
                                           params.placement)
            chains.append((candidate, (files, outcome, record.submit(uri, parent_run, revalidation.target, outcome))))
        outcomes, crashed = [], []
        for candidate, chain in chains:
            error = failure(*chain)
            if error is None:
                outcomes.append(chain[-1].result())
                logger.info("%s", outcomes[-1].line())
            else:  # a crash, after retries for transient I/O: reported, and left for the reconciler
                crashed.append(candidate.name)
                outcomes.append(Outcome.crashed(candidate, error))
                logger.error("%s: crashed: %s", candidate.name, error)

    summary = close_run(uri, parent_run, revalidation, outcomes, crashed)
    create_markdown_artifact(key="gate-decisions", description=f"Revalidation of {family}/{version}",
                             markdown=summary.markdown(outcomes))
    print(summary.line())
    return summary.as_dict()


if __name__ == "__main__":
    import sys

    transfer_on_base_update(family=sys.argv[1], version=sys.argv[2])
