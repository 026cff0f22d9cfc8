"""Tasks of register-base: the version into MLflow, then the event that starts its revalidation."""

from __future__ import annotations

from prefect import task

from transpeft.bases import BaseRef, describe_base
from transpeft.events import announcement, emit
from transpeft.tracking import BaseRecord

from . import IO, shared_registry


@task(**IO)
def register(uri: str, ref: BaseRef, parent: str | None) -> BaseRecord:
    """Fingerprint the base (its files; the weights are not loaded) and register it; the same base again
    is a no-op."""
    _, _, info = describe_base(ref)
    return shared_registry(uri).register_base(info, parent=parent)


@task(**IO)
def announce(record: BaseRecord, prefect_api_url: str | None = None) -> str:
    """Emit `transpeft.base.registered` for it; returns the event id."""
    return emit(announcement(record, "register-base-flow"), prefect_api_url)
