"""Announce a new base version to Prefect, whose deployment trigger (prefect.yaml) starts its revalidation.

    event = base_registered_event("demo", "v2", fingerprint="sha256:...", announced_by="transpeft-cli")
    emit(event)   # POST {PREFECT_API_URL}/events; raises EventNotDelivered unless the server took it

The deployment trigger in prefect.yaml matches `transpeft.base.registered` on resources
`transpeft.base.*` and starts `transfer-on-base-update/all-adapters` with the resource's
`transpeft.family` and `transpeft.version` labels as parameters.

Events go straight to the server's REST API, not through Prefect's `emit_event`: that one drops an
event without a word when no server answers, and a base whose revalidation never starts must be an
error. So the core library needs no Prefect import, only the API URL.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone

from . import auth
from .health import health_problem

BASE_REGISTERED = "transpeft.base.registered"
TRANSFER_DEPLOYMENT = "transfer-on-base-update/all-adapters"  # what the event starts (prefect.yaml)
DEFAULT_PREFECT_API_URL = "http://127.0.0.1:4200/api"
# Event ids derived from a seed (an MLflow delivery id) live in their own namespace.
_EVENT_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://transpeft/events")


class EventNotDelivered(RuntimeError):
    """The Prefect server cannot be reached or did not accept the event."""


def prefect_api_url(url: str | None = None) -> str:
    """The Prefect API to announce to: the argument, else PREFECT_API_URL, else the local stack's on its
    PREFECT_PORT (the image's demo runs it on a port of the caller's choosing), else the local default."""
    port = os.environ.get("PREFECT_PORT")
    local = f"http://127.0.0.1:{port}/api" if port else DEFAULT_PREFECT_API_URL
    url = url or os.environ.get("PREFECT_API_URL") or local
    return url.rstrip("/")


def check_reachable(api_url: str, timeout: float = 5) -> None:
    """Raise EventNotDelivered unless the Prefect server answers {api_url}/health."""
    problem = health_problem(f"{api_url}/health", timeout)
    if problem is None:
        return
    raise EventNotDelivered(f"Prefect server at {api_url} {problem}; start the local stack with `make up`, "
                            "or set PREFECT_API_URL to your Prefect server's API (http://HOST:PORT/api)")


def base_registered_event(family: str, version: str, event_id_seed: str | None = None, **payload) -> dict:
    """A `transpeft.base.registered` event for base family/version, with `payload` as its payload.

    Give `event_id_seed` (e.g. an MLflow delivery id) to derive the event id from it, so a replayed
    delivery carries the same id: Prefect stores an id once and its triggers act on it once (they
    remember ids for 15 minutes), so the replay starts no second run.
    """
    if not (isinstance(family, str) and family and isinstance(version, str) and version):
        raise ValueError(f"a base event needs a family and a version, got {family!r} and {version!r}")
    event_id = uuid.uuid5(_EVENT_ID_NAMESPACE, event_id_seed) if event_id_seed else uuid.uuid4()
    return {
        "id": str(event_id),
        "occurred": datetime.now(timezone.utc).isoformat(),
        "event": BASE_REGISTERED,
        "resource": {
            "prefect.resource.id": f"transpeft.base.{family}.{version}",
            "prefect.resource.name": f"{family}/{version}",
            "transpeft.family": family,
            "transpeft.version": version,
        },
        "payload": payload,
    }


def announcement(record, announced_by: str) -> dict:
    """The event announcing a registered base version (a ``tracking.BaseRecord``). Its id derives from
    the registry version, so announcing one registration again (a re-run command, a retried task, 20
    announcements in a burst) is one event to Prefect's triggers, and starts one revalidation."""
    return base_registered_event(record.family, record.version,
                                 event_id_seed=f"registered {record.family}/{record.version} #{record.model_version}",
                                 fingerprint=record.fingerprint, mlflow_version=record.model_version,
                                 source=record.source, parent=record.parent, announced_by=announced_by)


def emit(event: dict, api_url: str | None = None, timeout: float = 10) -> str:
    """POST the event to {api_url}/events and return its id; EventNotDelivered unless it was accepted."""
    api_url = prefect_api_url(api_url)
    request = urllib.request.Request(f"{api_url}/events", data=json.dumps([event]).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **auth.prefect_headers()})
    what = f"event {event.get('event')} ({event.get('id')})"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status  # Prefect answers 204
    except urllib.error.HTTPError as e:
        # Prefect explains a refusal in JSON (e.g. which field is missing); anything else is not Prefect.
        is_json = "json" in (e.headers.get("Content-Type") or "")
        detail = " ".join(e.read(600).decode(errors="replace").split()) if is_json else e.reason
        raise EventNotDelivered(f"Prefect server at {api_url} refused {what}: {e.code} {detail}") from None
    except OSError as e:
        raise EventNotDelivered(f"{what} not delivered: Prefect server at {api_url} is not reachable "
                                f"({getattr(e, 'reason', e)})") from None
    if not 200 <= status < 300:
        raise EventNotDelivered(f"Prefect server at {api_url} answered {status} to {what}")
    return event["id"]
