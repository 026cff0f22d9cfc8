"""register-base: a new base version into the MLflow registry, announced to Prefect.

    prefect deployment run 'register-base/new-version' -p source=demo-out/bases/v2 -p family=demo \
        -p version=v2 -p parent=v1

The announcement (event `transpeft.base.registered`) is what starts transfer-on-base-update; the
CLI `transpeft bases register` does the same two steps.
"""

from __future__ import annotations

from prefect import flow

from flows import PARAMS, registry_uri
from tasks.bases import announce, register
from transpeft.bases import BaseRef


@flow(name="register-base", log_prints=True)
def register_base(source: str, family: str, version: str, parent: str | None = None, revision: str | None = None,
                  params_file: str = PARAMS) -> dict:
    """Register ``source`` (a local directory, or a hub id pinned to ``revision``) as family/version."""
    record = register(registry_uri(params_file), BaseRef(source, revision, family, version), parent)
    event_id = announce(record)
    print(f"registered {family}/{version} (base-{family} version {record.model_version}); event {event_id}")
    return {"family": family, "version": version, "model_version": record.model_version, "event_id": event_id}
